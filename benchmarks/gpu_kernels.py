"""Compiled Triton kernels and a full model step against the torch path (stages of ``gpu_check.sh``).

``kernels``: forward and backward at the published models' shapes, in bf16, fp16 and fp32:

- attention with packed documents and image blocks (B/32 MMC4 text: L 2048, 8 heads of 64) and
  causal attention over an image block (B/16 LAION text: L 280, 12 heads of 64);
- the contrastive loss of ragged ranks: a global batch split unevenly over simulated ranks (one
  empty), each rank's rows against every rank's columns at its label offset, as the gathered
  loss runs; the ranks' losses, weighted by their pairs, must give the single-process loss;
- the LM-head cross-entropy (T 8192, D 512, V 49411, padding ignored).

Each output and gradient is compared with a float64 (float32 on 16-bit inputs' behalf: the torch
path in float64) reference: the Triton error must stay within twice the torch path's own error
at the same dtype, or under a floor per dtype. ``model``: one forward + backward of a whole LCL
model (B/16 LAION, full depth) with ``impl="triton"`` against ``impl="torch"``, float32 and under
bf16 autocast: the losses and the gradients' relative difference.

    python -m benchmarks.gpu_kernels kernels --json out.json [--dtypes bf16,fp16,fp32] [--tiny]
    python -m benchmarks.gpu_kernels model --json out.json [--tiny]

``--tiny``: small shapes for the CPU dry run (``TRITON_INTERPRET=1``). ``--jobs N`` compiles the
dtypes in N processes at once (Triton compiles one kernel at a time per process). Exit status 1
when a comparison fails; the JSON holds every number.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# the error a dtype may always show, relative to the reference's largest magnitude
FLOOR = {"bf16": 3e-2, "fp16": 5e-3, "fp32": 1e-4}


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _compare(name: str, dtype: str, got: dict, torch_path: dict, ref: dict) -> dict:
    """Per tensor: Triton's and the torch path's error against the reference; ``ok`` if Triton's is fine."""
    errors = {}
    ok = True
    for key, want in ref.items():
        e_triton, e_torch = _rel(got[key], want), _rel(torch_path[key], want)
        good = e_triton <= max(2 * e_torch, FLOOR[dtype]) and bool(torch.isfinite(got[key]).all())
        ok &= good
        errors[key] = {"triton": float(f"{e_triton:.3g}"), "torch": float(f"{e_torch:.3g}"), "ok": good}
    return {"check": name, "dtype": dtype, "ok": ok, "errors": errors}


def _grads(loss: torch.Tensor, inputs: dict) -> dict:
    grads = torch.autograd.grad(loss, list(inputs.values()))
    return {f"d{k}": g for k, g in zip(inputs, grads)}


# --------------------------------------------------------------------------------- attention


def _attention_case(name: str, tiny: bool, gen: torch.Generator):
    """(B, H, L, D, doc_ids, image_ids) of a published text shape (``tiny``: the dry run's)."""
    if name == "mmc4_b32":  # 4 documents per row, 2 images of 64 tokens in each of the first two
        batch, heads, length, head_dim = (1, 2, 64, 16) if tiny else (2, 8, 2048, 64)
        img_len = 4 if tiny else 66
        doc = torch.zeros(batch, length, dtype=torch.long)
        img = torch.full((batch, length), -1, dtype=torch.long)
        bounds = [0, length // 4, length // 2, 3 * length // 4, length - length // 16]
        for d in range(4):
            doc[:, bounds[d]:bounds[d + 1]] = d
            start = bounds[d] + (bounds[d + 1] - bounds[d]) // 3
            if d < 2:
                img[:, start:start + img_len] = d
        doc[:, bounds[-1]:] = -1  # padding
        return batch, heads, length, head_dim, doc, img
    batch, heads, length, head_dim = (2, 2, 48, 16) if tiny else (8, 12, 280, 64)
    img_len = 10 if tiny else 198  # <start_of_img> + 196 patches + <end_of_img>, image first
    img = torch.full((batch, length), -1, dtype=torch.long)
    img[:, 1:1 + img_len] = 0
    return batch, heads, length, head_dim, None, img


def check_attention(dtype: str, tiny: bool) -> list[dict]:
    from lcl_fast.ops.attention import interleaved_attention

    dev, out = _device(), []
    for name in ("mmc4_b32", "laion_b16"):
        gen = torch.Generator().manual_seed(0)
        batch, heads, length, head_dim, doc, img = _attention_case(name, tiny, gen)
        doc = None if doc is None else doc.to(dev)
        img = img.to(dev)
        base = [torch.randn(batch, heads, length, head_dim, generator=gen).to(dev) for _ in range(3)]
        grad = torch.randn(batch, heads, length, head_dim, generator=gen).to(dev)
        results = {}
        for impl, tdtype in (("triton", DTYPES[dtype]), ("torch", DTYPES[dtype]), ("ref", torch.float64)):
            q, k, v = (t.to(tdtype).requires_grad_() for t in base)
            o = interleaved_attention(q, k, v, doc_ids=doc, image_ids=img, causal=True,
                                      impl="torch" if impl == "ref" else impl)
            pad = (doc < 0)[:, None, :, None] if doc is not None else None
            if pad is not None:  # padding rows: zero on every path, not compared
                o = o.masked_fill(pad, 0)
            res = {"out": o.detach()}
            res.update(_grads((o.float() * grad.to(o.device)).sum(), {"q": q, "k": k, "v": v}))
            results[impl] = res
        out.append(_compare(f"attention {name} B{batch} H{heads} L{length} D{head_dim}", dtype,
                            results["triton"], results["torch"], results["ref"]))
    return out


# ------------------------------------------------------------------------------- contrastive


def check_contrastive(dtype: str, tiny: bool) -> list[dict]:
    """Ragged ranks: each rank's rows against the gathered columns at its label offset."""
    from lcl_fast.ops.contrastive import contrastive_loss
    from lcl_fast.ops.library import contrastive_op

    dev, out = _device(), []
    counts = [7, 0, 13, 4] if tiny else [1500, 0, 2011, 585]  # 4 ranks, one without pairs
    dim = 16 if tiny else 768
    total = sum(counts)
    gen = torch.Generator().manual_seed(1)
    image = torch.nn.functional.normalize(torch.randn(total, dim, generator=gen), dim=1).to(dev)
    text = torch.nn.functional.normalize(torch.randn(total, dim, generator=gen), dim=1).to(dev)
    results = {}
    for impl, tdtype in (("triton", DTYPES[dtype]), ("torch", DTYPES[dtype]), ("ref", torch.float64)):
        inputs = {"image": image.to(tdtype).requires_grad_(), "text": text.to(tdtype).requires_grad_(),
                  "scale": torch.tensor(20.0, dtype=torch.float32 if tdtype != torch.float64 else tdtype,
                                        device=dev).requires_grad_()}
        weighted, start, per_rank = 0.0, 0, []
        for n in counts:
            rows = slice(start, start + n)
            loss = contrastive_op(inputs["image"][rows], inputs["text"][rows], inputs["image"], inputs["text"],
                                  inputs["scale"], "torch" if impl == "ref" else impl, start, None)
            per_rank.append(loss.detach())
            weighted = weighted + loss * (n / total)
            start += n
        res = {"loss": torch.stack(per_rank)}
        res.update(_grads(weighted, inputs))
        results[impl] = res
        if impl == "ref":  # the ranks' weighted losses are the single-process loss
            whole = contrastive_loss(inputs["image"].detach(), inputs["text"].detach(), inputs["scale"].detach(),
                                     impl="torch")
            split_error = abs(float(weighted.detach()) - float(whole))
    entry = _compare(f"contrastive ragged ranks {counts} d{dim}", dtype, results["triton"], results["torch"],
                     results["ref"])
    entry["split_vs_single_process"] = float(f"{split_error:.3g}")
    entry["ok"] &= split_error < 1e-9
    out.append(entry)
    return out


# ----------------------------------------------------------------------------------- LM head


def check_lm_head(dtype: str, tiny: bool) -> list[dict]:
    from lcl_fast.ops.linear_cross_entropy import linear_cross_entropy

    dev = _device()
    tokens, dim, vocab = (32, 16, 97) if tiny else (8192, 512, 49411)
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(tokens, dim, generator=gen).to(dev)
    weight = (torch.randn(vocab, dim, generator=gen) * dim**-0.5).to(dev)
    labels = torch.randint(1, vocab, (tokens,), generator=gen)
    labels[torch.rand(tokens, generator=gen) < 0.1] = 0  # the pad id: ignored
    labels = labels.to(dev)
    results = {}
    for impl, tdtype in (("triton", DTYPES[dtype]), ("torch", DTYPES[dtype]), ("ref", torch.float64)):
        inputs = {"hidden": hidden.to(tdtype).requires_grad_(), "weight": weight.to(tdtype).requires_grad_()}
        loss = linear_cross_entropy(inputs["hidden"], inputs["weight"], labels, ignore_index=0,
                                    impl="torch" if impl == "ref" else impl)
        results[impl] = {"loss": loss.detach(), **_grads(loss, inputs)}
    return [_compare(f"lm_head T{tokens} D{dim} V{vocab}", dtype, results["triton"], results["torch"],
                     results["ref"])]


def run_kernels(dtypes: list[str], tiny: bool) -> list[dict]:
    records = []
    for dtype in dtypes:
        for check in (check_attention, check_contrastive, check_lm_head):
            start = time.perf_counter()
            for rec in check(dtype, tiny):
                rec["seconds"] = round(time.perf_counter() - start, 2)
                records.append(rec)
                print(f"{'ok  ' if rec['ok'] else 'FAIL'} {rec['dtype']:4s} {rec['check']}: "
                      + ", ".join(f"{k} {v['triton']:.2g} (torch {v['torch']:.2g})" for k, v in rec["errors"].items()),
                      flush=True)
    return records


# ------------------------------------------------------------------------------ model step


def run_model(tiny: bool) -> list[dict]:
    """One forward + backward of a whole model, ``impl="triton"`` against ``impl="torch"``."""
    from benchmarks import _model_inputs as mi
    from lcl_fast import LCLLoss, create_model

    dev = _device()
    if tiny:  # the interpreter runs every Triton program in numpy: the smallest model that has it all
        case = mi.ModelCase("LCL_tiny", "paired", 2, None, context_length=48)
    else:
        case = mi.ModelCase("LCL_ViT-B-16_laion", "paired", 8, None)
    cfg = mi.model_config(case)
    images, text = mi.make_batch(cfg, case.layout, case.batch)
    images, text = images.to(dev), text.to(dev)
    records = []
    torch.manual_seed(0)
    models = {impl: create_model(cfg, impl=impl, fused_generation_loss=True).to(dev) for impl in ("torch", "triton")}
    models["triton"].load_state_dict(models["torch"].state_dict())
    precisions = ["fp32"] + (["bf16"] if dev.type == "cuda" else [])
    for precision in precisions:
        start = time.perf_counter()
        out = {}
        for impl, model in models.items():
            model.train()
            model.zero_grad(set_to_none=True)
            autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")
            with autocast:
                contrastive, generation = LCLLoss(1.0, 0.1, impl=impl)(**model(images, text))
            (contrastive + generation).backward()
            grads = torch.cat([p.grad.flatten().double() for p in model.parameters() if p.grad is not None])
            out[impl] = (float(contrastive.detach()), float(generation.detach()), grads)
        (c_torch, g_torch, grad_torch), (c_tri, g_tri, grad_tri) = out["torch"], out["triton"]
        grad_rel = float((grad_tri - grad_torch).norm() / grad_torch.norm().clamp_min(1e-30))
        loss_rel = max(abs(c_tri - c_torch) / max(abs(c_torch), 1e-30), abs(g_tri - g_torch) / max(abs(g_torch), 1e-30))
        limit = {"fp32": 1e-3, "bf16": 5e-2}[precision]
        rec = {"check": f"model step {case.name} batch {case.batch}", "dtype": precision,
               "losses_torch": [c_torch, g_torch], "losses_triton": [c_tri, g_tri],
               "loss_rel_diff": float(f"{loss_rel:.3g}"), "grad_rel_diff": float(f"{grad_rel:.3g}"),
               "ok": loss_rel < limit and grad_rel < 10 * limit and all(map(lambda x: x == x, [c_tri, g_tri])),
               "seconds": round(time.perf_counter() - start, 2)}
        print(f"{'ok  ' if rec['ok'] else 'FAIL'} {precision} {rec['check']}: losses {rec['losses_triton']} vs "
              f"{rec['losses_torch']}, grads rel {grad_rel:.2g}", flush=True)
        records.append(rec)
    return records


def _parallel(args) -> list[dict]:
    """One process per dtype: their compiles run side by side."""
    procs = []
    for dtype in args.dtypes.split(","):
        path = f"{args.json}.{dtype}"
        cmd = [sys.executable, "-m", "benchmarks.gpu_kernels", "kernels", "--dtypes", dtype, "--json", path]
        procs.append((path, subprocess.Popen(cmd + (["--tiny"] if args.tiny else []))))
    records = []
    for path, proc in procs:
        proc.wait()
        if os.path.exists(path):
            with open(path) as f:
                records += json.load(f)["records"]
            os.remove(path)
        else:
            records.append({"check": f"process for {path}", "ok": False, "error": f"exit {proc.returncode}"})
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_kernels", description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["kernels", "model"])
    parser.add_argument("--json", required=True, help="where the records go")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--tiny", action="store_true", help="the dry run's shapes")
    parser.add_argument("--jobs", type=int, default=1, help="kernels: processes, one dtype each")
    args = parser.parse_args(argv)
    for dtype in args.dtypes.split(","):
        if dtype not in DTYPES:
            parser.error(f"--dtypes: unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    if args.what == "model":
        records = run_model(args.tiny)
    elif args.jobs > 1 and "," in args.dtypes:
        records = _parallel(args)
    else:
        records = run_kernels(args.dtypes.split(","), args.tiny)
    failed = [r["check"] + " " + r.get("dtype", "") for r in records if not r["ok"]]
    with open(args.json, "w") as f:
        json.dump({"records": records, "failed": failed}, f, indent=1)
    print(f"{len(records) - len(failed)}/{len(records)} checks passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
