"""Recompute the golden files' reference outputs with the LCL reference code (OpenGVLab/LCL).

Maintenance tool, not part of the test suite. It imports the reference from the path given (or an installed
``open_clip`` that is the LCL fork), feeds it the INPUTS stored in the golden files (config, state_dict,
images, text_ids; per-rank features and logit_scale; tokenizer strings) and either writes files with the
recomputed OUTPUTS (``--output DIR``) or compares them with the stored ones (``--check``, exit status 1 on a
mismatch). See tests/golden/README.md, section "Regenerating".
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import socket
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
MODEL_CASES = ("paired_a", "interleaved_a")
# Outputs that pass through the reference's float32 casts (features normalised with `.float()`, contrastive
# logits in float32; the total includes the contrastive part): ~1e-6. Pure float64: 1e-10. Gradients: 1e-5,
# because the float32 rounding of the contrastive part alone moves some parameter gradients by 1.2e-6 (stored
# files) and 1.8e-6 (a run here) against an all-float64 run of the same code (measured, README "Regenerating").
TOL_F32, TOL_F64, TOL_GRAD = 1e-6, 1e-10, 1e-5
F64_KEYS = ("gen_logits", "generation_loss", "logit_scale")
MODEL_OUTPUTS = ("image_features", "text_features", "gen_logits", "gen_labels", "logit_scale",
                 "contrastive_loss", "generation_loss", "total_loss", "grads")


def stub_torchvision() -> None:
    """Register a fake ``torchvision`` ONLY so that ``import open_clip`` succeeds (its transform.py and utils.py
    import names from torchvision at module level; torchvision cannot be installed beside this torch build).
    No transform is used here: every placeholder raises if it is ever called."""
    try:
        import torchvision  # noqa: F401
        return  # the real one is there: use it
    except ImportError:
        pass

    class _Unavailable:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("torchvision is stubbed by regenerate.py (imports only); transforms are unavailable")

    mods = {n: types.ModuleType(n) for n in ("torchvision", "torchvision.transforms",
                                             "torchvision.transforms.functional", "torchvision.ops",
                                             "torchvision.ops.misc")}
    names = ("Normalize", "Compose", "RandomResizedCrop", "ToTensor", "Resize", "CenterCrop", "ColorJitter",
             "Grayscale")
    for name in names:
        setattr(mods["torchvision.transforms"], name, _Unavailable)
    # Used as a default argument value at class definition time, so it needs real members.
    mods["torchvision.transforms"].InterpolationMode = enum.Enum("InterpolationMode", "NEAREST BILINEAR BICUBIC")
    mods["torchvision.ops.misc"].FrozenBatchNorm2d = _Unavailable
    for parent, child in (("torchvision", "transforms"), ("torchvision.transforms", "functional"),
                          ("torchvision", "ops"), ("torchvision.ops", "misc")):
        setattr(mods[parent], child, mods[f"{parent}.{child}"])
    sys.modules.update(mods)


def import_reference(src: str | None) -> types.ModuleType:
    """Import the reference's ``open_clip`` from ``src`` (its ``src/`` folder) or from the installed package."""
    if src:
        if not (Path(src) / "open_clip" / "lcl_model.py").is_file():
            sys.exit(f"--reference-src {src}: no open_clip/lcl_model.py there (give the reference's src/ folder)")
        sys.path.insert(0, str(Path(src).resolve()))
    stub_torchvision()
    try:
        import open_clip
        import open_clip.lcl_model
        import open_clip.loss
    except ImportError as e:
        sys.exit(f"cannot import the LCL reference's open_clip ({e}); pass --reference-src PATH/TO/LCL/src")

    if src and not Path(open_clip.__file__).resolve().is_relative_to(Path(src).resolve()):
        sys.exit(f"--reference-src {src}: open_clip was imported from {open_clip.__file__} instead")
    return open_clip


def run_model_case(oc: types.ModuleType, case: dict) -> dict:
    """One forward + backward of the reference LCL and LCLLoss in float64 on the stored inputs."""
    model = oc.lcl_model.LCL(**case["config"]).double()  # float64 first, so loading the weights rounds nothing
    model.load_state_dict(case["state_dict"], strict=True)
    loss_fn = oc.loss.LCLLoss(generation_loss_weight=case["generation_loss_weight"],
                              contrastive_loss_weight=case["contrastive_loss_weight"],
                              local_loss=True, gather_with_grad=True)  # the published training flags
    out = model(case["images"], case["text_ids"].clone())
    contrastive, generation = loss_fn(out["image_features"], out["text_features"], out["logits"], out["labels"],
                                      out["logit_scale"])
    total = contrastive + generation
    total.backward()
    got = {"image_features": out["image_features"], "text_features": out["text_features"],
           "gen_logits": out["logits"], "gen_labels": out["labels"], "logit_scale": out["logit_scale"],
           "contrastive_loss": contrastive, "generation_loss": generation, "total_loss": total,
           "grads": {k: p.grad for k, p in model.named_parameters()}}
    return {k: ({n: g.detach() for n, g in v.items()} if k == "grads" else v.detach()) for k, v in got.items()}


def _rank_main(rank: int, world: int, port: int, src: str | None, golden: str, out_dir: str) -> None:
    """One gloo rank: the reference LCLLoss (local loss, gather with grad) on that rank's stored features."""
    oc = import_reference(src)
    # LCLLoss.get_logits moves the per-rank pair count to the GPU (`.cuda()`) before gathering it; on CPU-only
    # gloo the identity is the minimal stand-in. Patched in this child process only.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mine = torch.load(golden)["ranks"][rank]
        loss_fn = oc.loss.LCLLoss(generation_loss_weight=1.0, contrastive_loss_weight=1.0, local_loss=True,
                                  gather_with_grad=True, rank=rank, world_size=world)
        image = mine["image_features"].clone().requires_grad_()
        text = mine["text_features"].clone().requires_grad_()
        # The generation term is not stored here; a one-token dummy keeps the call valid and is not backpropagated.
        contrastive, _ = loss_fn(image, text, torch.zeros(1, 2), torch.ones(1, dtype=torch.long),
                                 mine["logit_scale"])
        contrastive.backward()
        torch.save({"contrastive_loss": contrastive.detach(), "image_grad": image.grad, "text_grad": text.grad},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def run_distributed(src: str | None, golden: Path, stored: dict) -> dict:
    """Spawn ``world_size`` gloo ranks; return the stored dict with each rank's outputs recomputed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_main, args=(stored["world_size"], port, src, str(golden), tmp), nprocs=stored["world_size"])
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(stored["world_size"])]
    return {**stored, "ranks": [{**old, **new} for old, new in zip(stored["ranks"], ranks)]}


def run_tokenizer(oc: types.ModuleType, stored: dict) -> dict:
    """The reference tokenizer as its training builds it (LCL model config: three added special tokens)."""
    tok = oc.get_tokenizer("LCL_ViT-B-16_laion")
    cases = [{"text": c["text"], "encode": tok.encode(c["text"]), "ids_ctx64": tok(c["text"], 64)[0].tolist()}
             for c in stored["cases"]]
    return {**stored, "vocab_size": tok.vocab_size, "cases": cases}


def rel_diff(got: torch.Tensor, want: torch.Tensor, floor: float = 0.0) -> float:
    """max |got - want| / max(max |want|, floor); inf on a shape or dtype change."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return float("inf")
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    return err / max(want.double().abs().max().item() if want.numel() else 0.0, floor, 1e-300)


def compare(name: str, got: dict, want: dict) -> list[tuple[str, float, float]]:
    """(key, relative difference, tolerance) for every output of one golden file."""
    rows = []
    if name in MODEL_CASES:
        for key in MODEL_OUTPUTS[:-1]:
            exact = not want[key].is_floating_point()
            rows.append((key, rel_diff(got[key], want[key]), 0.0 if exact else
                         TOL_F64 if key in F64_KEYS else TOL_F32))
        # Two gradients are mathematically zero (a bias added to every key of a softmax) and hold only rounding
        # noise: measure every gradient against at least 1e-3 of the model's largest one (as tests do).
        floor = 1e-3 * max(g.abs().max().item() for g in want["grads"].values())
        if set(got["grads"]) != set(want["grads"]):
            rows.append(("grads: parameter names differ", float("inf"), TOL_GRAD))
        else:
            grad, worst = max((rel_diff(got["grads"][k], v, floor), k) for k, v in want["grads"].items())
            rows.append((f"grads (max: {worst})", grad, TOL_GRAD))
    elif name == "distributed_a":
        for r, (g, w) in enumerate(zip(got["ranks"], want["ranks"])):
            for key in ("contrastive_loss", "image_grad", "text_grad"):
                rows.append((f"ranks[{r}].{key}", rel_diff(g[key], w[key]), TOL_F32))
    else:
        same = [g == w for g, w in zip(got["cases"], want["cases"])] + [got["vocab_size"] == want["vocab_size"]]
        rows.append((f"cases ({len(want['cases'])}) + vocab_size: exact", float(not all(same)), 0.0))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference-src", help="the reference checkout's src/ folder (default: installed open_clip)")
    ap.add_argument("--golden", type=Path, default=HERE, help="folder with the stored golden files (inputs)")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--output", type=Path, help="write the regenerated files to this folder")
    mode.add_argument("--check", action="store_true", help="compare with the stored files; exit 1 on mismatch")
    args = ap.parse_args()
    for f in [*(f"{c}.pt" for c in MODEL_CASES), "distributed_a.pt", "tokenizer.json"]:
        if not (args.golden / f).is_file():
            sys.exit(f"--golden {args.golden}: {f} is missing")

    oc = import_reference(args.reference_src)
    results = {}
    for name in MODEL_CASES:
        stored = torch.load(args.golden / f"{name}.pt")
        results[name] = (stored, {**stored, **run_model_case(oc, stored)})
    stored = torch.load(args.golden / "distributed_a.pt")
    results["distributed_a"] = (stored, run_distributed(args.reference_src, args.golden / "distributed_a.pt", stored))
    stored = json.loads((args.golden / "tokenizer.json").read_text())
    results["tokenizer"] = (stored, run_tokenizer(oc, stored))

    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        for name, (_, new) in results.items():
            if name == "tokenizer":
                (args.output / "tokenizer.json").write_text(json.dumps(new, indent=1))  # the stored layout
            else:
                torch.save(new, args.output / f"{name}.pt")
        print(f"wrote {len(results)} files to {args.output}")
        return 0

    failed = 0
    for name, (stored, new) in results.items():
        for key, diff, tol in compare(name, new, stored):
            ok = diff <= tol
            failed += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name:14s} {key:48s} rel diff {diff:.3g} (tolerance {tol:g})")
    print("all outputs reproduced" if not failed else f"{failed} output(s) differ beyond tolerance")
    return int(failed > 0)


if __name__ == "__main__":
    sys.exit(main())
