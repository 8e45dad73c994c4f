"""Where a training step's time goes, and how much ``torch.compile`` could win on it.

Runs real steps of ``lcl_fast.train``'s :class:`~lcl_fast.training.loop.Trainer` (loader batches,
model, loss, backward, clipping, AdamW), eager, and with ``--compile`` the same batches again
through the compiled model + loss, in one process::

    python -m benchmarks.step_breakdown                      # the default run's model and data
    python -m benchmarks.step_breakdown --compile --steps 60 -- --batch-size 64

Reported: the median eager step; the LM-head cross-entropy op's part of it, timed in place (its
forward call and its backward node, no profiler); the rest of the step by kind of work, from the
profiler (which inflates small ops: an upper bound on what fusion could remove); and the
ceiling on a compiled step's speedup over eager, step / (what inductor leaves as it is: that op,
the matrix products, the attention and contrastive ops, the optimizer, the gradient norm).
Arguments after ``--`` go to ``lcl_fast.train``'s parser.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import lcl_fast.loss as loss_module
from lcl_fast.train import build_trainer
from lcl_fast.training import distributed as D
from lcl_fast.training.config import parse_config
from lcl_fast.training.host_memory import keep_freed_memory
from lcl_fast.training.step import StepFunction, compilations

_GEMM = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
         "aten::convolution_backward"}  # fmt: skip
# kinds of work inductor computes with the same library kernels as eager
FIXED = ("LM-head CE op", "matrix products", "attention/contrastive ops", "optimizer", "gradient norm")


class OpClock:
    """Wall time inside the LM-head cross-entropy op (forward call + backward node), per step."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._op = loss_module.linear_cross_entropy

    def __enter__(self) -> OpClock:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = self._op(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            if out.grad_fn is not None:
                mark: dict = {}
                out.grad_fn.register_prehook(lambda _g: mark.__setitem__("t", time.perf_counter()))
                out.grad_fn.register_hook(lambda _i, _o: self._add(time.perf_counter() - mark["t"]))
            return out

        loss_module.linear_cross_entropy = timed
        return self

    def _add(self, seconds: float) -> None:
        self.seconds += seconds

    def __exit__(self, *exc) -> None:
        loss_module.linear_cross_entropy = self._op


def _kind(event) -> str:
    names, node = [], event
    while node is not None:
        names.append(node.name)
        node = node.cpu_parent
    if any("linear_cross_entropy" in n for n in names):
        return FIXED[0]
    if event.name in _GEMM:
        return FIXED[1]
    if "scaled_dot_product" in event.name or any(n.startswith("lcl_fast::") for n in names):
        return FIXED[2]
    if "adamw" in event.name.lower() or any(n.startswith("Optimizer.step") for n in names):
        return FIXED[3]
    if event.name == "aten::linalg_vector_norm" or any("clip_grad" in n for n in names):
        return FIXED[4]
    return "other (fusable)"


def profile_kinds(step: Callable[[dict], None], batches: list[dict]) -> dict[str, float]:
    """Profiled self CPU milliseconds per step, by kind of work."""
    from torch.profiler import profile

    with profile() as prof:
        for batch in batches:
            step(batch)
    kinds: collections.Counter = collections.Counter()
    for event in prof.events():
        kinds[_kind(event)] += event.self_cpu_time_total / 1e3 / len(batches)
    return dict(kinds)


def timed_steps(step: Callable[[dict], None], batches: list[dict], clock: Optional[OpClock] = None):
    steps, ops = [], []
    for batch in batches:
        if clock is not None:
            clock.seconds = 0.0
        start = time.perf_counter()
        step(batch)
        steps.append(time.perf_counter() - start)
        ops.append(clock.seconds if clock is not None else 0.0)
    return statistics.median(steps) * 1e3, statistics.median(ops) * 1e3


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation included)")
    parser.add_argument("--compile", action="store_true", help="also time the compiled model + loss")
    parser.add_argument("train_args", nargs="*", help="lcl_fast.train arguments (after --)")
    args = parser.parse_args(argv)
    keep_freed_memory()
    cfg = parse_config(["--no-progress", "--report-to", "none", *args.train_args])
    with tempfile.TemporaryDirectory(prefix="step_breakdown-") as run_dir:
        trainer, _ = build_trainer(cfg, D.setup(cfg.device), Path(run_dir))
        return _measure(trainer, args)


def _measure(trainer, args: argparse.Namespace) -> dict:
    batches = [trainer._next_batch() for _ in range(args.warmup + args.steps)]
    warm, timed = batches[: args.warmup], batches[args.warmup :]

    def step(batch: dict) -> None:
        trainer.train_step([batch])

    for batch in warm:
        step(batch)
    with OpClock() as clock:
        eager, op = timed_steps(step, timed, clock)
    kinds = profile_kinds(step, timed[: min(10, len(timed))])
    fixed_share = sum(kinds.get(k, 0.0) for k in FIXED) / sum(kinds.values())
    print(f"eager step: median {eager:.1f} ms over {len(timed)} steps; LM-head CE op in place {op:.1f} ms "
          f"({100 * op / eager:.0f} %)")  # fmt: skip
    print("profiled, self CPU per step (the profiler inflates small ops):")
    for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:28s} {ms:7.1f} ms  {100 * ms / sum(kinds.values()):5.1f} %")
    print(f"ceiling on compiled / eager with those kernels unchanged: {1 / fixed_share:.2f}x "
          f"(work inductor leaves as it is: {100 * fixed_share:.0f} % of the profiled step)")  # fmt: skip
    result = {"eager_ms": eager, "op_ms": op, "kinds_ms": kinds, "ceiling": 1 / fixed_share}
    if args.compile:
        trainer.step_fn = StepFunction(trainer.model, trainer.loss_fn, compile=True)
        start = time.perf_counter()
        for batch in warm:
            step(batch)
        warmup = time.perf_counter() - start
        compiled, _ = timed_steps(step, timed)
        print(f"compiled step: median {compiled:.1f} ms ({eager / compiled:.2f}x eager); {compilations()} "
              f"compilation(s), warm-up {warmup:.1f} s over {len(warm)} steps")  # fmt: skip
        result.update(compiled_ms=compiled, warmup_s=warmup)
    return result


if __name__ == "__main__":
    main()
