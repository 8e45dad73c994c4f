"""Pre-train LCL: ``python -m lcl_fast.train`` or ``torchrun --nproc_per_node=N -m lcl_fast.train``.

Without arguments it is a demo: it builds the built-in synthetic corpus (once), trains a tiny
LCL on it, measures zero-shot retrieval on held-out pairs, an attentive probe's top-1 (colour ×
shape) and the CIDEr of generated captions before and after, and prints a short summary. The
flags follow open_clip's trainer (``--help`` lists them); multi-node runs use the same command
under torchrun's rendezvous::

    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK \\
        --rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:29500 -m lcl_fast.train --model ... --train-data ...

A run writes ``<logs>/<name>/``: ``out.log``, ``metrics.jsonl``, ``eval.jsonl``, ``summary.json``,
``curves.png``, ``tensorboard/`` and ``checkpoints/step_*.pt``.
"""

from __future__ import annotations

import random
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .errors import report
from .training import distributed as D
from .training.checkpoint import latest_checkpoint
from .training.config import ConfigError, TrainConfig, parse_config
from .training.evaluation import RunEvaluator
from .training.host_memory import keep_freed_memory
from .training.logging_utils import (
    RunRecorder,
    close_logging,
    default_run_name,
    log,
    plot_curves,
    setup_logging,
)
from .training.loop import Trainer, TrainingHalted
from .training.optim import build_optimizer, cosine_with_warmup, default_warmup, param_groups
from .training.summary import print_summary, summarize

DEFAULT_STEPS = 384  # the demo run (neither --epochs nor --steps): six epochs of 32-pair batches on one rank


# ---------------------------------------------------------------------- building blocks
def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_precision(cfg: TrainConfig, env: D.DistEnv) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    return "amp_bf16" if env.device.type == "cuda" else "fp32"


def autocast_factory(precision: str, env: D.DistEnv):
    dtype = {"amp_bf16": torch.bfloat16, "amp": torch.float16}.get(precision)
    if dtype is None:
        return nullcontext
    return partial(torch.autocast, env.device.type, dtype=dtype)


def prepare_run_dir(cfg: TrainConfig, env: D.DistEnv) -> Path:
    """``<logs>/<name>``, the name agreed by all ranks; a fresh run may not reuse a folder."""
    name = D.gather_objects(cfg.name or default_run_name(cfg.model), env)[0]
    run_dir = Path(cfg.logs) / name
    if cfg.resume is None and (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        raise ConfigError(
            f"--name {name}: {run_dir} already holds checkpoints; pick another --name or "
            "continue it with --resume latest"
        )
    D.barrier(env)  # every rank has looked before rank 0 creates anything
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    D.barrier(env)
    return run_dir


def build_model(cfg: TrainConfig, env: D.DistEnv):
    from .factory import create_model, get_model_config

    model_config = get_model_config(cfg.model)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = create_model(
        model_config,
        pretrained=cfg.pretrained,
        impl=cfg.impl,
        fused_generation_loss=cfg.fused_generation_loss,
    ).to(env.device)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model_config.pop("custom_text", None)
    return model, model_config


def build_loss(cfg: TrainConfig, env: D.DistEnv):
    from .loss import LCLLoss

    return LCLLoss(
        cfg.lcl_generation_loss_weight,
        cfg.lcl_contrastive_loss_weight,
        local_loss=cfg.local_loss,
        gather_with_grad=cfg.gather_with_grad,
        rank=env.rank,
        world_size=env.world_size,
        impl=cfg.impl,
    )


def build_loader(cfg: TrainConfig, env: D.DistEnv, tokenizer, model):
    from .data import build_train_loader

    if cfg.dataset_type == "synthetic":  # built once, by rank 0, before the others read it
        from .data.synthetic import ensure_corpus

        if env.is_main:
            ensure_corpus()
        D.barrier(env)

    return build_train_loader(
        cfg.dataset_type,
        cfg.train_data,
        tokenizer,
        batch_size=cfg.batch_size,
        context_length=cfg.interleaved_context_length or model.text.context_length,
        num_img_token=model.num_img_token,
        image_size=model.vision_cfg.image_size,
        img_first_prob=cfg.img_first_prob,
        pack=cfg.pack,
        rank=env.rank,
        world_size=env.world_size,
        workers=cfg.workers,
        seed=cfg.seed,
        device=env.device,
        num_samples=cfg.train_num_samples,
        shuffle_buffer=cfg.shuffle_buffer,
        resampled=cfg.dataset_resampled,
        shard_cache=cfg.cache_dir,
        image_root=cfg.mmc4_images,
        data_audit=cfg.data_audit,
        # --steps fixes the run's length: shards of unknown size (remote, no sizes.json) need no count
        run_steps=cfg.steps * cfg.accum_freq if cfg.steps else None,
    )


def schedule_length(cfg: TrainConfig, loader) -> tuple[int, int]:
    """(total optimizer steps, optimizer steps per epoch)."""
    steps_per_epoch = max(1, len(loader) // cfg.accum_freq)
    if cfg.steps is not None:
        return cfg.steps, steps_per_epoch
    if cfg.epochs is not None:
        return cfg.epochs * steps_per_epoch, steps_per_epoch
    return DEFAULT_STEPS, steps_per_epoch


def build_optimization(cfg: TrainConfig, model, total_steps: int, precision: str, env: D.DistEnv):
    optimizer = build_optimizer(
        param_groups(model, cfg.wd), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, kind=cfg.optimizer,
        for_compile=cfg.torchcompile and cfg.compile_optimizer,
    )
    warmup = default_warmup(total_steps, cfg.warmup)
    scheduler = cosine_with_warmup(optimizer, warmup, total_steps)
    scaler = torch.amp.GradScaler(env.device.type) if precision == "amp" else None
    return optimizer, scheduler, scaler, warmup


def resume_path(cfg: TrainConfig, run_dir: Path) -> Optional[Path]:
    if cfg.resume is None:
        return None
    if cfg.resume != "latest":
        return Path(cfg.resume)
    found = latest_checkpoint(run_dir)
    if found is None:
        log.info("--resume latest: no checkpoint in %s yet; starting from scratch", run_dir)
    return found


# ---------------------------------------------------------------------- main
def build_trainer(cfg: TrainConfig, env: D.DistEnv, run_dir: Path) -> tuple[Trainer, RunEvaluator]:
    """Model, data, optimizer, loss, logging and evaluation of one run, wired into a :class:`Trainer`."""
    from .data import get_tokenizer

    precision = resolve_precision(cfg, env)
    autocast = autocast_factory(precision, env)
    model, model_config = build_model(cfg, env)
    tokenizer = get_tokenizer(context_length=model.text.context_length)
    loader = build_loader(cfg, env, tokenizer, model)
    total_steps, steps_per_epoch = schedule_length(cfg, loader)
    # before the optimizer: FSDP2 swaps the parameters
    wrapped = D.wrap_model(model, env, fsdp=cfg.fsdp, precision=precision)
    optimizer, scheduler, scaler, warmup = build_optimization(cfg, model, total_steps, precision, env)
    seed_all(cfg.seed + env.rank)
    recorder = RunRecorder(run_dir, env, tensorboard=cfg.report_to == "tensorboard", progress=cfg.progress)
    evaluator = RunEvaluator(cfg, env, wrapped, tokenizer, autocast, recorder, steps_per_epoch, total_steps)
    trainer = Trainer(
        cfg, env, wrapped, build_loss(cfg, env), optimizer, scheduler, scaler, loader, recorder, run_dir,
        total_steps=total_steps, steps_per_epoch=steps_per_epoch, autocast=autocast, evaluate=evaluator,
        model_config=model_config,
    )  # fmt: skip
    mode = "FSDP2" if cfg.fsdp else ("DDP" if env.distributed else "single process")
    log.info("%d steps (%d per epoch), warm-up %d, precision %s, %s", total_steps, steps_per_epoch, warmup,
             precision, mode)  # fmt: skip
    return trainer, evaluator


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse → build → (resume) → evaluate → train → evaluate → summarize. Returns the exit status.

    Bad input (a flag, a file, a shard) ends in one line ``lcl_fast.train: error: ...`` on stderr, the
    last thing this process prints, and status 2; ``--debug`` shows the traceback instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(parse_config(argv))
    except Exception as err:  # a user error is reported in one line (after the cleanup); a bug is re-raised
        return report(err, "lcl_fast.train", argv)


def run(cfg: TrainConfig) -> int:
    """One run of a parsed config (see :func:`main`)."""
    t_start = time.perf_counter()
    try:
        env = D.setup(cfg.device, cfg.dist_timeout)  # ConfigError: no GPU, or more ranks than GPUs on this node
        if env.distributed and not cfg.local_loss:
            raise ConfigError("--no-local-loss: LCL's contrastive loss needs --local-loss when distributed")
        run_dir = prepare_run_dir(cfg, env)
        setup_logging(run_dir, env)
        log.info("run %s: world %d, device %s; config %s", run_dir, env.world_size, env.device, cfg.to_dict())
        if cfg.keep_freed_memory and keep_freed_memory():
            log.info("host memory: freed memory is kept for reuse (--no-keep-freed-memory: the C library's default)")
        trainer, evaluator = build_trainer(cfg, env, run_dir)
        path = resume_path(cfg, run_dir)
        if path is not None:
            trainer.resume(path)
        trainer.recorder.start(trainer.state.step if path is not None else -1)
        if trainer.state.eval_before is None:
            trainer.state.eval_before = evaluator(trainer.state.step, "before")
        stopped = trainer.fit()
        after = evaluator(trainer.state.step, "after") if stopped is None else {}
        wall = time.perf_counter() - t_start
        summary = summarize(trainer, trainer.state.eval_before, after, env, wall, stopped)
        trainer.recorder.write_json("summary.json", summary)
        if env.is_main:
            plot_curves(run_dir, summary["chance"])
            print_summary(summary, run_dir)
        D.cleanup(drain=True)  # every rank got here: let in-flight collectives settle before teardown
        return 0
    except TrainingHalted as err:
        log.error("%s", err)
        return 1
    finally:
        close_logging()
        D.cleanup()


if __name__ == "__main__":
    sys.exit(main())
