"""``python -m lcl_fast.export``: write a pre-trained LCL encoder for transformers, timm or open_clip.

Examples::

    python -m lcl_fast.export --model LCL_ViT-B-32_laion --pretrained logs/run/checkpoints/epoch_32.pt \\
        --format hf --output exports/lcl-b32-hf
    python -m lcl_fast.export --model my_config.json --pretrained epoch_32.pt --format timm --output exports/timm
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import ArgumentParser, CheckpointError, CheckpointMismatchError, UserError, add_debug_flag, report
from . import FORMATS, export
from ._common import EXTRA_HINT, check_output

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

_FORMAT_HELP = """\
hf: transformers CLIPVisionModel folder (config.json, model.safetensors, preprocessor_config.json),
    loaded with CLIPVisionModel.from_pretrained(DIR) and by LLaVA-1.5's --vision_tower DIR.
timm: folder for timm.create_model("local-dir:DIR", pretrained=True).
open_clip: the whole model (open_clip_pytorch_model.bin + open_clip_config.json) for the reference's
    open_clip.create_model(NAME, pretrained="DIR/open_clip_pytorch_model.bin").
hf and timm folders also hold pooler.safetensors (LCL's attentive pooler; see lcl_fast.export.pooler)."""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m lcl_fast.export",
        description="Export a pre-trained LCL vision encoder (exactly: same arithmetic, other names).",
        epilog=_FORMAT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="a shipped config name (lcl_fast.list_models()) or a JSON file")
    p.add_argument(
        "--pretrained", required=True,
        help="checkpoint to export: anything lcl_fast.create_model(..., pretrained=) loads "
        "(trainer checkpoints, the reference's open_clip checkpoints, bare state dicts)",
    )
    p.add_argument("--format", required=True, choices=FORMATS, help="see below")
    p.add_argument("--output", required=True, help="folder to create (must not already hold files)")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default="fp32", help="dtype of the written weights")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it holds files")
    p.add_argument(
        "--trust-checkpoint", action="store_true",
        help="unpickle arbitrary objects in --pretrained (torch.load weights_only=False); only for files you trust",
    )
    p.add_argument(
        "--push-to-hub", metavar="REPO",
        help="also upload the folder to the Hugging Face Hub repo REPO via huggingface_hub (needs network and "
        "a login; not covered by the offline test suite)",
    )
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    add_debug_flag(p)
    return p


def _model_name(model: str) -> str:
    return Path(model).stem if model.endswith(".json") else model


def push_to_hub(folder: Path, repo: str, private: bool) -> str:
    """Upload ``folder`` to the Hub repo ``repo`` (created if absent); returns the repo URL."""
    try:
        from huggingface_hub import HfApi
    except ImportError as err:
        raise ImportError(f"--push-to-hub needs huggingface_hub: {EXTRA_HINT}") from err
    api = HfApi()
    url = api.create_repo(repo, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message="Upload LCL encoder (lcl_fast.export)")
    return str(url)


def _export(args) -> Path:
    from lcl_fast.factory import create_model, get_model_config, load_checkpoint

    check_output(args.output, args.overwrite)  # fail before the (slow) checkpoint load
    config = get_model_config(args.model)
    print(f"loading {args.pretrained} into {args.model} ...", file=sys.stderr)
    model = create_model(config)
    try:
        load_checkpoint(model, args.pretrained, weights_only=not args.trust_checkpoint)
    except CheckpointMismatchError as err:  # a readable checkpoint of another model (a corrupt file says so itself)
        raise UserError(f"--pretrained {args.pretrained} does not match --model {args.model}: {err}") from err
    except CheckpointError as err:  # torch refused objects in it: this command's switch for that
        text = str(err).replace("pass weights_only=False", "pass --trust-checkpoint")
        raise CheckpointError(text) from err
    try:
        return export(
            model, args.format, args.output, name=_model_name(args.model), model_config=config,
            dtype=_DTYPES[args.dtype], overwrite=args.overwrite,
        )
    except (ValueError, TypeError) as err:  # the model cannot be written in this format
        raise UserError(f"--format {args.format}: {err}") from err
    except ImportError as err:  # an optional package the format needs (the message says which)
        raise UserError(str(err)) from err


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Export; bad input exits with status 2 and one line ``lcl_fast.export: error: ...`` (``--debug``: traceback)."""
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    args = build_parser().parse_args(argv)
    try:
        out = _export(args)
    except Exception as err:  # a user error becomes one line; a bug keeps its traceback
        raise SystemExit(report(err, "lcl_fast.export", argv)) from None
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"wrote {args.format} export to {out}: {files}")
    if args.push_to_hub:
        try:
            url = push_to_hub(out, args.push_to_hub, args.private)
        except Exception as err:  # network, auth: the local export stands
            print(f"push to {args.push_to_hub} failed ({err}); the export is at {out}", file=sys.stderr)
            return 1
        print(f"pushed to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
