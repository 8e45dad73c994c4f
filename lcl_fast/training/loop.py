"""The training loop: one optimizer step over ``accum_freq`` micro-batches, faults, checkpoints, evaluation.

A step: forward + backward of each micro-batch (DDP syncs gradients on the last one only), then
one check agreed by all ranks (a single all-reduce of two flags and the step's sample/token counts):
was any loss or gradient norm non-finite, did any rank receive SIGTERM. Reading that check is the
step's one host sync on a GPU: losses and the gradient norm stay on the device and are read
(together, in one transfer) only on log steps. A non-finite step is skipped (no update; counted,
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
    agree_step,
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
    """One step's outcome. ``losses`` (loss, contrastive, caption) and ``grad_norm`` stay on the device
    (reading them is a host sync): :meth:`read` gives them as floats."""

    losses: torch.Tensor  # float32 [3]
    grad_norm: torch.Tensor  # float32 0-dim
    skipped: bool
    stop_requested: bool
    samples: int = 0  # this step's samples and tokens, all ranks
    tokens: int = 0

    def read(self) -> tuple[float, float, float, float]:
        """(loss, contrastive, caption, grad norm), in one transfer."""
        loss, contrastive, caption, norm = torch.cat(
            [self.losses, self.grad_norm.reshape(1).to(self.losses.device)]
        ).tolist()
        return loss, contrastive, caption, norm


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
        self._pending: list[torch.Tensor] = []  # losses [3] of good steps not yet in first/last_losses
        self._shown: dict[str, str] = {"loss": "-"}  # the progress bar's loss, as of the last log step
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
        losses = torch.stack([contrastive + caption, contrastive, caption])
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        # Every rank computes the norm, finite loss or not: under FSDP2 it is a collective.
        max_norm = self.cfg.grad_clip_norm if self.cfg.grad_clip_norm is not None else math.inf
        grad_norm = clip_grad_norm(self._params, max_norm)
        # Under fp16 AMP a gradient overflow is routine: the scaler skips that step by itself.
        bad = ~torch.isfinite(losses[0])
        if self.scaler is None:
            bad = bad | ~torch.isfinite(grad_norm.to(bad.device))
        pad_id = getattr(unwrap(self.model), "pad_id", 0)
        counts = [batch_counts(b, pad_id) for b in micro_batches]  # the loader's, counted on the host
        bad, stop, samples, tokens = agree_step(
            bad, self.stop.signal is not None, (sum(c[0] for c in counts), sum(c[1] for c in counts)), self.env
        )  # the step's one host sync
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
        return StepResult(losses.detach(), grad_norm.detach(), bad, stop, samples, tokens)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_payload(self) -> dict:
        """Everything to continue exactly; collective (every rank must call it)."""
        self._flush_losses()
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
    def _read_logged(self, result: StepResult) -> list[float]:
        """(loss, contrastive, caption, grad norm, logit scale) of this step, and the pending losses into
        the summary's windows: one device-to-host transfer."""
        scale = unwrap(self.model).logit_scale.detach().float().exp().mean()
        device = result.losses.device
        parts = [result.losses, result.grad_norm.reshape(1).to(device), scale.reshape(1).to(device)]
        pending, self._pending = self._pending, []
        values = torch.cat([*parts, *pending]).tolist()
        self._add_losses([values[5 + 3 * i:8 + 3 * i] for i in range(len(pending))])
        return values[:5]

    def _flush_losses(self) -> None:
        """Read the pending losses into ``first_losses``/``last_losses`` (one transfer; before a checkpoint
        or the summary)."""
        pending, self._pending = self._pending, []
        if pending:
            self._add_losses(torch.stack(pending).tolist())

    def _add_losses(self, rows: list[list[float]]) -> None:
        s = self.state
        for losses in rows:
            if len(s.first_losses) < WINDOW:
                s.first_losses.append(losses)
            s.last_losses = (s.last_losses + [losses])[-WINDOW:]

    def _record(self, result: StepResult, rates: tuple[float, float]) -> None:
        s = self.state
        loss, contrastive, caption, grad_norm, logit_scale = self._read_logged(result)
        self._shown["loss"] = f"{loss:.3f}"
        record = {
            "step": s.step,
            "epoch": s.step / self.steps_per_epoch,
            "loss": loss,
            "contrastive_loss": contrastive,
            "caption_loss": caption,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "grad_norm": grad_norm,
            "logit_scale": logit_scale,
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
            loss, _, _, grad_norm = result.read()  # a rare step: reading it costs nothing that matters
            log.warning(
                "step %d: non-finite loss or gradient (loss %s, grad norm %s): update skipped "
                "(%d in a row, %d in all)",
                s.step,
                loss,
                grad_norm,
                s.nonfinite_in_row,
                s.skipped_nonfinite,
            )
            return
        s.nonfinite_in_row = 0
        # Kept on the device until the next log step or checkpoint reads them all at once; only those
        # that can still land in the first or the last WINDOW are kept.
        self._pending.append(result.losses)
        keep_first = max(WINDOW - len(s.first_losses), 0)
        if len(self._pending) > keep_first + WINDOW:
            del self._pending[keep_first]

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
                samples, tokens = result.samples, result.tokens
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
                        "loss": self._shown["loss"],  # as of the last log step: no read per step
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
            self._flush_losses()
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
