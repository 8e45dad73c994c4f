"""Every code example in README.md runs (issue 25, item 3), each in a fresh process whose working folder is
the repository root, as a user runs them after ``git clone && cd``.

Blocks are found when the tests are collected, so examples added later are covered. An HTML comment on
the lines right before a fence marks it:

- ``<!-- not run: REASON -->``: skipped; the reason is required (say which test covers it instead).
- ``<!-- example: NAME -->``: names the block, for ``after``.
- ``<!-- after: NAME -->``: runs after the named block: python code continues that block's script
  (its names are defined); a shell block before it runs first, as its own process.

Every unmarked ``python`` block runs as written. A shell block (``bash``, ``sh``, ``shell``) runs only
when named, with its paths and model swapped for tiny ones by ``SETTINGS`` below, so that nothing large
is trained or written into the clone; an unmarked shell block fails here until it is marked.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PYTHON, SHELL = ("python", "py"), ("bash", "sh", "shell", "console")
_FENCE = re.compile(r"^```([\w+-]*)[ \t]*$")
_MARK = re.compile(r"^<!--\s*(not run|example|after)\s*:\s*(.*?)\s*-->$")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marks: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.marks.get('example', self.lang)}"


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of ``text`` with the marker comments on the lines just above each fence."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"README.md:{i + 1}: the code block is not closed"
        marks, k = {}, i - 1
        while k >= 0 and (found := _MARK.match(lines[k].strip())):
            marks[found.group(1)] = found.group(2)
            k -= 1
        blocks.append(Block(i + 1, m.group(1).lower(), "\n".join(lines[i + 1 : end]) + "\n", marks))
        i = end + 1
    return blocks


BLOCKS = [b for b in readme_blocks(README.read_text(encoding="utf-8")) if b.lang in PYTHON + SHELL]
NAMED = {b.marks["example"]: b for b in BLOCKS if "example" in b.marks}

# Tiny settings for the shell blocks that run, and the paths python blocks after them read: README text
# -> replacement ({tmp}: the test's temporary folder, which _tiny_checkpoint fills).
SETTINGS = {
    "export-hf": {
        "logs/lcl_b16/checkpoints/step_50000.pt": "{tmp}/epoch_1.pt",
        "--model LCL_ViT-B-16_laion": "--model {tmp}/lcl_tiny.json",
        "exports/lcl-b16-hf": "{tmp}/lcl-b16-hf",
    },
}


def _tiny_checkpoint(tmp: Path) -> None:
    """LCL_tiny's config and a trainer-style checkpoint of it, for the export example."""
    import lcl_fast

    cfg = lcl_fast.get_model_config("LCL_tiny")
    (tmp / "lcl_tiny.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    state = {f"module.{k}": v for k, v in lcl_fast.create_model(cfg).state_dict().items()}
    torch.save({"epoch": 1, "state_dict": state}, tmp / "epoch_1.pt")


def _chain(block: Block) -> list[Block]:
    chain, seen = [block], {block.line}
    while "after" in chain[0].marks:
        name = chain[0].marks["after"]
        assert name in NAMED, f"README.md:{chain[0].line}: 'after: {name}' names no '<!-- example: {name} -->'"
        chain.insert(0, NAMED[name])
        assert chain[0].line not in seen, f"README.md:{block.line}: the 'after' marks go round in a circle"
        seen.add(chain[0].line)
    return chain


def _swap(code: str, tmp: Path, names: list[str]) -> str:
    for name in names:
        for old, new in SETTINGS.get(name, {}).items():
            code = code.replace(old, new.format(tmp=tmp))
    return code


def _run(cmd: list[str], stdin: str, what: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", PATH=os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")]))
    proc = subprocess.run(cmd, cwd=REPO, input=stdin, capture_output=True, text=True, env=env, timeout=300)
    output = f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{output}"


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_example_runs(block: Block, tmp_path):
    if "not run" in block.marks:
        assert len(block.marks["not run"]) >= 10, f"README.md:{block.line}: say why the block is not run"
        pytest.skip(f"README.md:{block.line} not run: {block.marks['not run']}")
    chain = _chain(block)
    names = [b.marks["example"] for b in chain if "example" in b.marks]
    if any(b.lang in SHELL for b in chain):
        _tiny_checkpoint(tmp_path)
    script = ""
    for b in chain:
        if b.lang in SHELL:
            name = b.marks.get("example")
            assert name in SETTINGS, (
                f"README.md:{b.line}: a shell block runs only with tiny settings: name it "
                "(<!-- example: NAME -->) and add SETTINGS[NAME] in tests/test_readme.py, or mark it "
                "<!-- not run: REASON -->"
            )
            assert not script, f"README.md:{b.line}: a shell block cannot follow python code"
            _run(["bash", "-euo", "pipefail", "-c", _swap(b.code, tmp_path, names)], "", f"README.md:{b.line}")
        else:
            script += _swap(b.code, tmp_path, names)
    if script:
        _run([sys.executable, "-"], script, f"README.md:{block.line}")


def test_readme_markers_are_understood():
    """Each block's marks make sense, and the python examples that run are there (so a broken parse cannot
    skip them all)."""
    for b in BLOCKS:
        if "after" in b.marks:
            _chain(b)
        assert not ("not run" in b.marks and b.marks["not run"] == ""), f"README.md:{b.line}: give the reason"
    run = [b for b in BLOCKS if "not run" not in b.marks and b.lang in PYTHON]
    assert len(run) >= 3 and any("build_paired_text" in b.code for b in run)
    assert NAMED["export-hf"].lang in SHELL and "--format hf" in NAMED["export-hf"].code
    for name, swaps in SETTINGS.items():
        assert name in NAMED, f"SETTINGS[{name!r}]: no README block is named {name!r}"
        stale = [old for old in swaps if old not in NAMED[name].code]
        assert not stale, f"SETTINGS[{name!r}]: {stale} no longer in README.md:{NAMED[name].line}"


def test_marker_parser():
    text = (
        "x\n<!-- not run: needs a GPU cluster -->\n<!-- example: a -->\n```bash\necho hi\n```\n"
        "```python\nprint(1)\n```\n"
    )
    a, b = readme_blocks(text)
    assert (a.lang, a.code, a.marks) == ("bash", "echo hi\n", {"not run": "needs a GPU cluster", "example": "a"})
    assert (b.lang, b.code, b.marks, b.line) == ("python", "print(1)\n", {}, 7)
