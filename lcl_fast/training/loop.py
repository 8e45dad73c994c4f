"""The training loop: one optimizer step over ``accum_freq`` micro-batches, faults, checkpoints, evaluation.

A step: forward + backward of each micro-batch (DDP syncs gradients on the last one only), then
one check agreed by all ranks (a single all-reduce of two flags): was any loss or gradient norm
non-finite, did any rank receive SIGTERM. A non-finite step is skipped (no update; counted,
logged); ``max_nonfinite_steps`` in a row stop the run with a checkpoint. SIGTERM saves a
checkpoint and ends the run cleanly.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from . import checkpoint as ckpt
from .config import TrainConfig
from .distributed import (
    DistEnv,
    any_true,
    average_grads,
    clip_grad_norm,
    gather_objects,
    no_sync,
    scalar_params,
    unwrap,
)
from .logging_utils import RunRecorder, Throughput, batch_counts, log
from .optim import clamp_logit_scale, prime_optimizer_state
from .step import StepFunction, compilations

WINDOW = 10  # steps averaged for the summary's first/last losses


class TrainingHalted(RuntimeError):
    """The run stopped itself (too many non-finite losses); a checkpoint was written."""


@dataclass
class TrainState:
    """Counters that travel in the checkpoint."""

    step: int = 0
    samples: int = 0  # pairs (paired data) or documents (interleaved), all ranks; never packed rows
    tokens: int = 0  # non-padding text tokens that reached the model, all ranks
    train_seconds: float = 0.0
    warmup_seconds: float = 0.0  # steps during which torch.compile compiled (part of train_seconds)
    warmup_samples: int = 0
    warmup_tokens: int = 0
    compilations: int = 0
    skipped_nonfinite: int = 0
    nonfinite_in_row: int = 0
    first_losses: list = field(default_factory=list)  # [loss, contrastive, caption] of the first steps
    last_losses: list = field(default_factory=list)
    eval_before: Optional[dict] = None


@dataclass
class StepResult:
    loss: float
    contrastive_loss: float
    caption_loss: float
    grad_norm: float
    skipped: bool
    stop_requested: bool


class StopFlag:
    """Set by SIGTERM (main thread only); restores the previous handler on close."""

    def __init__(self) -> None:
        self.signal: Optional[str] = None
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Evaluation must not move the training's random streams (exact resume)."""
    state = ckpt.rng_state()
    try:
        yield
    finally:
        ckpt.set_rng_state(state)


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        env: DistEnv,
        model: nn.Module,
        loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: Optional[torch.amp.GradScaler],
        loader: Any,
        recorder: RunRecorder,
        run_dir: Path,
        *,
        total_steps: int,
        steps_per_epoch: int,
        autocast: Callable[[], AbstractContextManager],
        evaluate: Callable[[int, str], dict],
        model_config: dict,
    ):
        self.cfg, self.env, self.model, self.loss_fn = cfg, env, model, loss_fn
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.loader, self.recorder, self.run_dir = loader, recorder, run_dir
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.autocast, self.evaluate, self.model_config = autocast, evaluate, model_config
        self.state = TrainState()
        self.stop = StopFlag()
        self._batches: Optional[Iterator[dict]] = None
        self._params = [p for p in model.parameters() if p.requires_grad]
        # FSDP2 leaves the scalar parameters replicated: their gradients are averaged here.
        self._replicated = scalar_params(unwrap(model)) if cfg.fsdp else []
        self.last_checkpoint: Optional[Path] = None
        # --torchcompile: model + loss as one graph (value checks stay eager, per batch); under DDP the
        # module, under FSDP2 each block (step.compile_wrapped)
        self.step_fn = StepFunction(model, loss_fn, compile=cfg.torchcompile)
        # this process's first step, and its steps that compiled nothing: compile_seconds()
        self._first_step_seconds: Optional[float] = None
        self._steady = [0.0, 0]  # seconds, steps
        self._optimizer_step = optimizer.step
        if cfg.torchcompile and cfg.compile_optimizer:
            self._optimizer_step = torch.compile(optimizer.step, fullgraph=False)

    # ------------------------------------------------------------------ data
    def _next_batch(self) -> dict:
        for _ in range(2):  # a finished epoch, then the next one
            if self._batches is None:
                self._batches = iter(self.loader)
            try:
                return next(self._batches)
            except StopIteration:
                self._batches = None
        raise RuntimeError("the data loader yields no batches (len(loader) is 0?)")

    # ------------------------------------------------------------------ one step
    def _forward_backward(self, batch: dict, last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        with no_sync(self.model, last):
            with self.autocast():
                contrastive, caption = self.step_fn(batch)
            total = (contrastive.to(caption.device) + caption) / self.cfg.accum_freq
            (self.scaler.scale(total) if self.scaler is not None else total).backward()
        return contrastive.detach().float().to(caption.device), caption.detach().float()

    def train_step(self, micro_batches: list[dict]) -> StepResult:
        """Forward/backward every micro-batch, then update unless a rank saw a non-finite loss."""
        self.model.train()
        parts = [
            self._forward_backward(b, last=i == len(micro_batches) - 1) for i, b in enumerate(micro_batches)
        ]
        contrastive = torch.stack([c for c, _ in parts]).mean()
        caption = torch.stack([g for _, g in parts]).mean()
        average_grads(self._replicated, self.env)
        loss = float(contrastive + caption)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        # Every rank computes the norm, finite loss or not: under FSDP2 it is a collective.
        max_norm = self.cfg.grad_clip_norm if self.cfg.grad_clip_norm is not None else math.inf
        grad_norm = clip_grad_norm(self._params, max_norm)
        # Under fp16 AMP a gradient overflow is routine: the scaler skips that step by itself.
        bad = not math.isfinite(loss) or (not math.isfinite(grad_norm) and self.scaler is None)
        bad, stop = any_true([bad, self.stop.signal is not None], self.env)
        if bad:
            if self.scaler is not None:
                self.scaler.update()  # close the scaler's step (unscale_ ran)
        elif self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self._optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)
        if not bad:
            clamp_logit_scale(unwrap(self.model))
        self.scheduler.step()
        return StepResult(loss, float(contrastive), float(caption), grad_norm, bad, stop)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_payload(self) -> dict:
        """Everything to continue exactly; collective (every rank must call it)."""
        module = unwrap(self.model)
        payload = {
            "step": self.state.step,
            "epoch": self.state.step // self.steps_per_epoch,
            "name": self.run_dir.name,
            "model": self.cfg.model,
            "model_config": self.model_config,
            "state_dict": get_model_state_dict(module, options=_FULL),
            "optimizer": get_optimizer_state_dict(module, self.optimizer, options=_FULL),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "world_size": self.env.world_size,
            "rng": gather_objects(ckpt.rng_state(), self.env),
            "data": gather_objects(ckpt.to_safe(self.loader.state_dict()), self.env),
            "train_state": ckpt.to_safe(asdict(self.state)),
            "config": self.cfg.to_dict(),
        }
        return payload

    def save(self) -> Optional[Path]:
        payload = self.checkpoint_payload()
        if self.env.is_main:
            self.last_checkpoint = ckpt.save_checkpoint(
                payload, self.run_dir, self.state.step, self.cfg.keep_checkpoints
            )
            log.info("checkpoint: %s", self.last_checkpoint)
        return self.last_checkpoint

    def resume(self, path: Path) -> None:
        data = ckpt.load_checkpoint_file(path)
        module = unwrap(self.model)
        set_model_state_dict(module, data["state_dict"], options=StateDictOptions(full_state_dict=True))
        # --compile-optimizer: the state DCP would create with an eager step, made by the compiled one
        prime_optimizer_state(self.optimizer, self._params, self._optimizer_step)
        set_optimizer_state_dict(
            module, self.optimizer, data["optimizer"], options=StateDictOptions(full_state_dict=True)
        )
        self.scheduler.load_state_dict(data["scheduler"])
        if self.scaler is not None and data.get("scaler"):
            self.scaler.load_state_dict(data["scaler"])
        self.state = TrainState(**ckpt.from_safe(data["train_state"]))
        if data["world_size"] == self.env.world_size:
            ckpt.set_rng_state(data["rng"][self.env.rank])
            self.loader.load_state_dict(ckpt.from_safe(data["data"][self.env.rank]))
        else:
            log.warning(
                "checkpoint was written by %d ranks, this run has %d: data position and random "
                "state start afresh (the model, optimizer and schedule continue)",
                data["world_size"],
                self.env.world_size,
            )
        log.info("resumed from %s at step %d", path, self.state.step)

    # ------------------------------------------------------------------ the loop
    def _count(self, micro_batches: list[dict]) -> tuple[int, int]:
        """(samples, tokens) this step trained on, summed over micro-batches and ranks."""
        pad_id = getattr(unwrap(self.model), "pad_id", 0)
        counts = [batch_counts(b, pad_id) for b in micro_batches]
        samples, tokens = sum(c[0] for c in counts), sum(c[1] for c in counts)
        if self.env.distributed:  # ranks pack different numbers of documents
            t = torch.tensor([samples, tokens], dtype=torch.int64, device=self.env.device)
            torch.distributed.all_reduce(t)
            samples, tokens = (int(v) for v in t.tolist())
        return samples, tokens

    def _record(self, result: StepResult, rates: tuple[float, float]) -> None:
        s = self.state
        record = {
            "step": s.step,
            "epoch": s.step / self.steps_per_epoch,
            "loss": result.loss,
            "contrastive_loss": result.contrastive_loss,
            "caption_loss": result.caption_loss,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "grad_norm": result.grad_norm,
            "logit_scale": float(unwrap(self.model).logit_scale.detach().float().exp().mean()),
            "samples_per_s": rates[0],
            "tokens_per_s": rates[1],
            "skipped_nonfinite": s.skipped_nonfinite,
            "data_skipped": sum(self.loader.skip_counts.values()),
            "padding_fraction": self.loader.padding_fraction,
        }
        if result.skipped:
            record["skipped"] = True
        self.recorder.train_metrics(record)

    def _track(self, result: StepResult) -> None:
        s = self.state
        if result.skipped:
            s.skipped_nonfinite += 1
            s.nonfinite_in_row += 1
            log.warning(
                "step %d: non-finite loss or gradient (loss %s, grad norm %s): update skipped "
                "(%d in a row, %d in all)",
                s.step,
                result.loss,
                result.grad_norm,
                s.nonfinite_in_row,
                s.skipped_nonfinite,
            )
            return
        s.nonfinite_in_row = 0
        losses = [result.loss, result.contrastive_loss, result.caption_loss]
        if len(s.first_losses) < WINDOW:
            s.first_losses.append(losses)
        s.last_losses = (s.last_losses + [losses])[-WINDOW:]

    def _epoch_end_tasks(self) -> None:
        cfg, s = self.cfg, self.state
        at_end = s.step >= self.total_steps
        epoch_done = s.step % self.steps_per_epoch == 0
        epoch = s.step // self.steps_per_epoch
        if epoch_done and not at_end:
            self.evaluate(s.step, "epoch")  # the evaluator knows what is due
        save = (epoch_done and cfg.save_frequency and epoch % cfg.save_frequency == 0) or (
            cfg.save_every_n_steps and s.step % cfg.save_every_n_steps == 0
        )
        if save and not at_end:
            self.save()

    def fit(self) -> Optional[str]:
        """Train to ``total_steps``. Returns None, or the name of the signal that stopped the run early."""
        cfg, s = self.cfg, self.state
        self.recorder.open_bar(self.total_steps, s.step)
        window = Throughput()
        rates = (0.0, 0.0)
        try:
            while s.step < self.total_steps:
                t0 = time.perf_counter()
                compiled_before = compilations()
                micro_batches = [self._next_batch() for _ in range(cfg.accum_freq)]
                result = self.train_step(micro_batches)
                samples, tokens = self._count(micro_batches)
                seconds = time.perf_counter() - t0
                s.step += 1
                s.samples += samples
                s.tokens += tokens
                s.train_seconds += seconds
                if compilations() > compiled_before:  # warm-up, reported apart from the steady state
                    s.compilations += compilations() - compiled_before
                    s.warmup_seconds += seconds
                    s.warmup_samples += samples
                    s.warmup_tokens += tokens
                    window.reset()
                    log.info("step %d compiled %d graph(s) in %.1f s", s.step, compilations() - compiled_before,
                             seconds)
                else:
                    self._steady = [self._steady[0] + seconds, self._steady[1] + 1]
                if self._first_step_seconds is None:
                    self._first_step_seconds = seconds
                window.add(samples, tokens)
                self._track(result)
                if s.step % cfg.log_every_n_steps == 0 or result.skipped or s.step == self.total_steps:
                    rates = window.read()
                    self._record(result, rates)
                self.recorder.advance(
                    {
                        "loss": f"{result.loss:.3f}",
                        "lr": f"{float(self.optimizer.param_groups[0]['lr']):.2e}",
                        "samples/s": f"{rates[0]:.0f}",
                        "tok/s": f"{rates[1]:.0f}",
                        "pad": f"{100 * self.loader.padding_fraction:.0f}%",
                    }
                )
                if s.nonfinite_in_row >= cfg.max_nonfinite_steps:
                    self.save()
                    raise TrainingHalted(
                        f"stopping: {s.nonfinite_in_row} non-finite losses in a row (steps "
                        f"{s.step - s.nonfinite_in_row + 1}–{s.step}; --max-nonfinite-steps "
                        f"{cfg.max_nonfinite_steps}). The weights were never updated from them; checkpoint "
                        f"{self.last_checkpoint}. Lower --lr, add --grad-clip-norm, or check the data."
                    )
                if result.stop_requested:
                    self.save()
                    return self.stop.signal or "SIGTERM"  # another rank got it
                self._epoch_end_tasks()
            self.save()
            return None
        finally:
            self.recorder.close()
            self.stop.close()
            self._batches = None

    def compile_seconds(self) -> float:
        """``--torchcompile``: the time compiling added to this process's first step (its seconds minus
        a step's without compilation; the whole first step when every step compiled). 0 otherwise."""
        if not self.cfg.torchcompile or self._first_step_seconds is None:
            return 0.0
        steady = self._steady[0] / self._steady[1] if self._steady[1] else 0.0
        return max(self._first_step_seconds - steady, 0.0)

    def data_skips(self) -> dict:
        """Data-loader skip counts summed over ranks (collective)."""
        total: dict = {}
        for counts in gather_objects(dict(self.loader.skip_counts), self.env):
            for kind, n in counts.items():
                total[kind] = total.get(kind, 0) + int(n)
        return total
