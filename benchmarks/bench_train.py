"""End-to-end training throughput (group ``train``): N real steps, loader → model → loss → optimizer.

Every contender reads the same sample stream (the built-in corpus: paired webdataset shards, or
MMC4 documents) from a fresh loader, in the same order, and trains N steps on it:

- ``reference``: the reference's strategy: padded rows, ``impl="reference"`` (dense masks, full
  logits), no fused loss, torch's default AdamW;
- ``lcl-fast``: eager, ``impl="auto"`` (torch on the CPU, triton on CUDA), fused generation loss;
- ``lcl-fast-pack``: the same, rows packed with several documents (``--pack``);
- ``lcl-fast-compile`` / ``lcl-fast-pack-compile``: model + loss compiled as one graph
  (:class:`lcl_fast.training.step.StepFunction`, what ``--torchcompile`` runs).

Throughput counts what users count: samples (pairs, or documents) and non-padding tokens per
second. A packed step trains more documents than a padded one, so ``speedup_vs_reference`` is the
ratio of samples/s here (``speedup_by="throughput"``), not of step times. The first call of a
compiled contender compiles; its time is recorded apart (``warmup_s``, ``compilations``) and
excluded from the timed calls.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import Optional

import pytest
import torch

from benchmarks import _harness as h

STRATEGIES = ["reference", "lcl-fast", "lcl-fast-pack", "lcl-fast-compile", "lcl-fast-pack-compile"]


@dataclass(frozen=True)
class TrainCase:
    model: str
    data: str  # "pairs" | "mmc4"
    batch: int
    steps: int
    context_length: Optional[int] = None  # text context override (documents need room to pack)

    @property
    def label(self) -> str:
        ctx = f" ctx={self.context_length}" if self.context_length else ""
        return f"{self.model} {self.data} batch={self.batch}{ctx} steps={self.steps}"


CASES: list[TrainCase] = h.by_scale(
    smoke=[TrainCase("LCL_tiny", "pairs", 8, 2), TrainCase("LCL_tiny", "mmc4", 4, 2, 256)],
    small=[TrainCase("LCL_tiny", "pairs", 32, 20), TrainCase("LCL_tiny", "mmc4", 8, 10, 1024)],
    # the GPU shapes: B/16 on LAION-style pairs, B/32 on MMC4 documents (full depth)
    full=[TrainCase("LCL_ViT-B-16_laion", "pairs", 128, 20), TrainCase("LCL_ViT-B-32_mmc4", "mmc4", 16, 20)],
)
if os.environ.get("LCL_BENCH_TRAIN_STEPS"):  # gpu_check.sh: 30 steps each
    CASES = [replace(c, steps=int(os.environ["LCL_BENCH_TRAIN_STEPS"])) for c in CASES]


def _loader_factory(case: TrainCase, model, pack: bool):
    from lcl_fast.data import build_train_loader, get_tokenizer
    from lcl_fast.data.synthetic import ensure_corpus

    root = ensure_corpus()
    tokenizer = get_tokenizer(context_length=model.text.context_length)
    dataset_type, folder = ("webdataset", root / "pairs") if case.data == "pairs" else ("mmc4", root / "mmc4")

    def make():
        return build_train_loader(
            dataset_type, str(folder), tokenizer, batch_size=case.batch, context_length=model.text.context_length,
            num_img_token=model.num_img_token, image_size=model.vision_cfg.image_size, img_first_prob=0.5,
            pack=pack, seed=0, device=h.device(),
        )

    return make


_COUNTS: dict = {}


def _counts(case: TrainCase, pack: bool, make_loader, pad_id: int) -> tuple[int, int, float]:
    """(samples, tokens, padding fraction) of the first ``case.steps`` batches (data only; cached)."""
    from lcl_fast.training.logging_utils import batch_counts

    key = (case, pack)
    if key not in _COUNTS:
        loader = make_loader()
        samples = tokens = 0
        for _, batch in zip(range(case.steps), loader):
            s, t = batch_counts(batch, pad_id)
            samples, tokens = samples + s, tokens + t
        _COUNTS[key] = (samples, tokens, loader.padding_fraction)
    return _COUNTS[key]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", CASES, ids=[f"{c.model}-{c.data}-b{c.batch}" for c in CASES])
def test_train(benchmark, strategy: str, case: TrainCase) -> None:
    from benchmarks._model_inputs import autocast
    from benchmarks.bench_train_step import adamw
    from lcl_fast import LCLLoss, create_model, get_model_config
    from lcl_fast.training.optim import clamp_logit_scale
    from lcl_fast.training.step import StepFunction, compilations

    reference = strategy == "reference"
    pack, compiled = "pack" in strategy, "compile" in strategy
    impl = "reference" if reference else "auto"
    config = get_model_config(case.model)
    if case.context_length:
        config["text_cfg"]["context_length"] = case.context_length
    torch.manual_seed(0)
    model = create_model(config, impl=impl, fused_generation_loss=not reference).to(h.device())
    model.train()
    loss_fn = LCLLoss(1.0, 0.1, local_loss=True, gather_with_grad=True, impl=impl)
    optimizer = adamw(model, impl)
    step_fn = StepFunction(model, loss_fn, compile=compiled)
    make_loader = _loader_factory(case, model, pack)
    samples, tokens, padding = _counts(case, pack, make_loader, model.pad_id)

    def run() -> None:
        for _, batch in zip(range(case.steps), make_loader()):
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                contrastive, caption = step_fn(batch)
            (contrastive + caption).backward()
            optimizer.step()
            clamp_logit_scale(model)

    warmup_s, compiled_graphs = None, 0
    if compiled:  # the compilation, timed apart (the harness's warm-up call then runs warm)
        before = compilations()
        start = time.perf_counter()
        run()
        if h.on_cuda():
            torch.cuda.synchronize()
        warmup_s, compiled_graphs = time.perf_counter() - start, compilations() - before
    before = compilations()
    info = h.measure(
        benchmark, run, group=f"train {case.label}", impl=strategy,
        work={"samples": samples, "tokens": tokens}, heavy=False,
        params={"op": "train", "model": case.model, "data": case.data, "batch": case.batch, "steps": case.steps,
                "pack": pack, "compiled": compiled, "model_impl": impl, "padding_fraction": round(padding, 4),
                "warmup_s": warmup_s, "compilations": compiled_graphs, "speedup_by": "throughput"},
    )  # fmt: skip
    info["recompilations_after_warmup"] = compilations() - before  # 0 unless a batch recompiled
