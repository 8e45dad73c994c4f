"""One host sync a step: a steady-state training step reads the device once, for its non-finite check.

Counted on the CPU with :class:`tests._syncs.SyncCounter` (value reads, device-to-host copies,
ops with data-dependent output shapes) over full steps of ``lcl_fast.train.main``; the data
loader's own host-side work is not counted (on a GPU it runs on host tensors).
"""

from __future__ import annotations

import pytest
import torch

from lcl_fast.ops import linear_cross_entropy as lce
from lcl_fast.train import main
from lcl_fast.training import loop
from tests._syncs import SyncCounter

ARGS = ["--batch-size", "4", "--no-progress", "--report-to", "none", "--val-pairs", "0", "--save-frequency", "0",
        "--seed", "7", "--steps", "8", "--log-every-n-steps", "3"]
LOG_STEPS = {3, 6, 8}


def _optimizer_host_tensors(trainer):
    """An optimizer's step counters: host tensors on a GPU too unless fused/capturable (then no read)."""
    return [s["step"] for s in trainer.optimizer.state.values() if "step" in s]


def count_syncs_per_step(monkeypatch, argv: list[str]) -> list[list[tuple[str, str]]]:
    """The sync events of each step (index 0: step 1) of ``main(argv)``."""
    counter, starts, trainers = SyncCounter(host=lambda: _optimizer_host_tensors(trainers[0])), [], []
    real_step, real_next, real_fit = loop.Trainer.train_step, loop.Trainer._next_batch, loop.Trainer.fit

    def train_step(self, micro_batches):
        starts.append(len(counter.events))
        return real_step(self, micro_batches)

    def next_batch(self):
        counter.paused = True
        try:
            return real_next(self)
        finally:
            counter.paused = False

    def fit(self):
        trainers.append(self)
        with counter:
            return real_fit(self)

    # The label-range check of the fused CE runs on CPU tensors only (it returns at once for CUDA ones):
    # this step is counted as it runs on a GPU.
    monkeypatch.setattr(lce, "_check_label_range", lambda *a, **k: None)
    monkeypatch.setattr(loop.Trainer, "train_step", train_step)
    monkeypatch.setattr(loop.Trainer, "_next_batch", next_batch)
    monkeypatch.setattr(loop.Trainer, "fit", fit)
    assert main(argv) == 0
    bounds = starts + [len(counter.events)]
    return [counter.events[a:b] for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("extra", [[], ["--grad-clip-norm", "1.0", "--accum-freq", "2"]], ids=["plain", "clip-accum"])
def test_one_rank_reads_the_device_once_a_step(train_env, monkeypatch, extra):
    steps = count_syncs_per_step(monkeypatch, [*ARGS, "--logs", str(train_env), "--name", "syncs", *extra])
    assert len(steps) == 8
    report = "\n".join(f"step {i + 1}: {len(e)}: {e}" for i, e in enumerate(steps))
    for i, events in enumerate(steps[1:-1], start=2):  # step 1 warms up; the last one saves
        budget = 2 if i in LOG_STEPS else 1  # a log step reads its logged values in one more transfer
        assert len(events) <= budget, f"step {i}: {len(events)} host syncs, budget {budget}\n{report}"


def _rank_syncs(rank: int, world: int, logs: str, out: str) -> None:
    """One rank of a 2-rank gloo run: its sync events per step, into ``out``.rank."""
    import json
    import os

    from _pytest.monkeypatch import MonkeyPatch

    from lcl_fast import train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    patch = MonkeyPatch()
    patch.setattr(train.D, "cleanup", lambda **kw: None)  # the spawning harness owns the process group
    try:
        steps = count_syncs_per_step(patch, [*ARGS, "--logs", logs, "--name", "syncs2"])
    finally:
        patch.undo()
    with open(f"{out}.{rank}", "w") as f:
        json.dump(steps, f)


def test_two_ranks_sync_twice_a_step(corpus_cache, tmp_path):
    """Several ranks: the step's agreement (one all-reduce) and the contrastive loss's pair counts (one
    all-gather: under NCCL their ranks' counts reach the host through the device)."""
    import json

    from tests._dist import spawn_gloo

    spawn_gloo(_rank_syncs, 2, str(tmp_path / "logs"), str(tmp_path / "syncs"), timeout_s=240)
    for rank in range(2):
        steps = json.loads((tmp_path / f"syncs.{rank}").read_text())
        assert len(steps) == 8
        report = "\n".join(f"step {i + 1}: {len(e)}: {e}" for i, e in enumerate(steps))
        for i, events in enumerate(steps[1:-1], start=2):
            budget = 3 if i in LOG_STEPS else 2
            assert len(events) <= budget, f"rank {rank} step {i}: {len(events)} host syncs, budget {budget}\n{report}"


def test_losses_read_late_fill_the_same_summary_windows():
    """Losses wait on the device until a log step or checkpoint reads them: the summary's first and last
    windows are those of every good step, in order, whenever the reads happen."""
    trainer = object.__new__(loop.Trainer)
    trainer.state, trainer._pending = loop.TrainState(), []
    good = []
    for i in range(37):
        skipped = i in (4, 20)
        losses = torch.tensor([float(i), i + 0.5, i + 0.25]) * (float("nan") if skipped else 1.0)
        trainer.state.step = i + 1
        trainer._track(loop.StepResult(losses, torch.tensor(1.0), skipped, False))
        good += [] if skipped else [losses.tolist()]
        if i == 28:  # 27 good steps pending by then: more than both windows need
            trainer._flush_losses()
    trainer._flush_losses()
    assert trainer.state.first_losses == good[: loop.WINDOW] and trainer.state.last_losses == good[-loop.WINDOW:]
    assert not trainer._pending


def test_input_checks_read_the_loaders_host_counts(golden_dir):
    """A loader batch brings its text's counts (computed on the host): the checks read nothing from the
    device, and still refuse a batch whose images do not match its text."""
    from lcl_fast.targets import loss_targets, text_stats
    from lcl_fast.training.step import prepare_batch
    from tests.compile.test_compiled_step import _batches, _golden_model

    golden = torch.load(golden_dir / "paired_a.pt")
    model, _ = _golden_model(golden, "torch")
    batch = _batches(golden, [[0, 1, 2, 3, 4, 5]])[0]
    ids = model.target_token_ids
    batch.update(target_token_ids=ids, targets=loss_targets(batch["text_ids"], None, None, ids),
                 text_stats=text_stats(batch["text_ids"], ids))
    with SyncCounter() as counter:
        prepare_batch(model, batch)
    assert counter.events == []
    batch["images"] = batch["images"][:5]  # one image short
    with pytest.raises(ValueError, match="img_placehold"):
        prepare_batch(model, batch)
