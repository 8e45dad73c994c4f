"""``TrainConfig``: every setting of a training run, parsed from open_clip-style flags and checked up front.

The flags are built from the dataclass fields (``batch_size`` → ``--batch-size``), so the help text
lives in one place. :func:`parse_config` checks everything it can before any work starts (model
name, data paths, number ranges) and exits with a message that names the offending flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from ..errors import ArgumentParser, UserError, add_debug_flag

DATASET_TYPES = ("synthetic", "webdataset", "mmc4", "obelics")
PRECISIONS = ("auto", "amp_bf16", "amp", "fp32")
OPTIMIZERS = ("adamw", "apex_fused_adam")
DEFAULT_MODEL = "LCL_tiny"
RECIPE_WARMUP = 2000  # the published scripts' warm-up
SYNTHETIC_CORPORA = (None, "pairs", "interleaved", "mmc4")  # --train-data values of the built-in corpus


class ConfigError(UserError):
    """A bad setting, found before any work; the message names the flag."""


def _field(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Settings of one run. Defaults give the built-in demo (a tiny LCL on the synthetic corpus, CPU-sized);
    the published recipe is ``--model LCL_ViT-B-32_laion --lr 5e-4 --warmup 2000 --grad-checkpointing``..."""

    # --- model
    model: str = _field(
        DEFAULT_MODEL, "registered model name (see lcl_fast.list_models()) or a JSON config path"
    )
    pretrained: Optional[str] = _field(
        None, "initial weights: a checkpoint path (state_dict of the same model)"
    )
    impl: str = _field(
        "auto",
        "op implementation (auto: triton on CUDA, torch on CPU)",
        choices=("auto", "torch", "triton", "reference"),
    )
    fused_generation_loss: bool = _field(
        True, "fuse LM head and cross-entropy (no full logits in memory)", negatable=True
    )
    grad_checkpointing: bool = _field(
        False, "recompute block activations in the backward pass (saves memory)"
    )
    torchcompile: bool = _field(
        False, "torch.compile model + loss as one graph (value checks stay eager; warm-up reported apart)"
    )
    compile_optimizer: bool = _field(
        False, "with --torchcompile, compile a foreach AdamW step instead of the fused one (slower on CPU)"
    )
    # --- data
    train_data: Optional[str] = _field(
        None,
        "shards: a folder, a brace pattern or a '::' list; synthetic: nothing "
        "(pairs) or 'interleaved' (the built-in corpus, built if absent)",
    )
    dataset_type: str = _field("synthetic", "which data reader", choices=DATASET_TYPES)
    interleaved_context_length: Optional[int] = _field(
        None, "tokens per sequence (default: the model's context length)"
    )
    num_img_token: Optional[int] = _field(
        None, "tokens per image; must equal the model's grid² (default: that)"
    )
    img_first_prob: float = _field(0.5, "probability that an image comes before its text")
    pack: bool = _field(False, "pack several documents into one row (no padding waste)")
    train_num_samples: Optional[int] = _field(
        None,
        "samples per epoch (default: counted; remote shards: from a sizes.json beside them, "
        "not needed with --steps)",
    )
    dataset_resampled: bool = _field(False, "draw shards with replacement (open_clip's resampling)")
    shuffle_buffer: int = _field(1000, "samples per data stream in the sample shuffle buffer (0: off)")
    cache_dir: Optional[str] = _field(
        None,
        "copy remote shards whole into this folder before reading (default: stream them); "
        "shard indexes are kept here too (default: $LCL_FAST_CACHE, ~/.cache/lcl_fast)",
    )
    mmc4_images: Optional[str] = _field(
        None, "MMC4 image folder or URL prefix (default: <root>/images beside <root>/data)"
    )
    data_audit: Optional[str] = _field(
        None, "append each consumed sample's key to this file (.rank<r> added per rank)"
    )
    workers: int = _field(0, "data-loader worker processes per rank")
    batch_size: int = _field(32, "sequences per rank per micro-step")
    # --- schedule
    epochs: Optional[int] = _field(
        None, "epochs to train (--epochs or --steps; neither: the demo's 384 steps)"
    )
    steps: Optional[int] = _field(None, "optimizer steps to train (instead of --epochs)")
    lr: float = _field(1e-3, "peak learning rate (published recipe: 5e-4, MMC4 3e-4)")
    wd: float = _field(0.2, "weight decay (matrices only)")
    beta1: float = _field(0.9, "AdamW beta1")
    beta2: float = _field(0.98, "AdamW beta2")
    eps: float = _field(1e-6, "AdamW epsilon")
    warmup: Optional[int] = _field(
        None, f"linear warm-up steps (default: {RECIPE_WARMUP}, or a tenth of the run if that is shorter)"
    )
    accum_freq: int = _field(1, "micro-steps per optimizer step (gradient accumulation)")
    grad_clip_norm: Optional[float] = _field(None, "clip the global gradient norm to this value")
    optimizer: str = _field(
        "adamw",
        "adamw: torch AdamW (fused on CUDA); apex_fused_adam: NVIDIA apex FusedAdam",
        choices=OPTIMIZERS,
    )
    # --- loss
    lcl_generation_loss_weight: float = _field(1.0, "weight of the generation (next-token) loss")
    lcl_contrastive_loss_weight: float = _field(0.1, "weight of the contrastive loss")
    local_loss: bool = _field(
        True,
        "contrastive logits of local features against all ranks' (LCL needs it when distributed)",
        negatable=True,
    )
    gather_with_grad: bool = _field(
        True, "all-gather features with gradient (full distributed gradient)", negatable=True
    )
    # --- precision and distribution
    precision: str = _field("auto", "auto: amp_bf16 on CUDA, fp32 on CPU", choices=PRECISIONS)
    device: str = _field("auto", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"))
    fsdp: bool = _field(False, "shard parameters, gradients and optimizer state with FSDP2 (instead of DDP)")
    keep_freed_memory: bool = _field(
        True, "glibc reuses freed host memory instead of returning it (no page faults per step; "
        "resident memory stays at its peak)", negatable=True,
    )
    dist_timeout: float = _field(
        300.0, "seconds a collective or the process-group set-up may wait for a peer before failing"
    )
    seed: int = _field(0, "random seed (rank r uses seed + r for data randomness)")
    # --- faults
    max_nonfinite_steps: int = _field(
        10, "stop (with a checkpoint) after this many non-finite losses in a row"
    )
    # --- checkpoints and logs
    logs: str = _field(
        "./logs",
        "folder of run folders (alias --logs-dir: under torchrun, whose --logs-specs makes --logs ambiguous)",
        aliases=("--logs-dir",),
    )
    name: Optional[str] = _field(None, "run folder name under --logs (default: date-time and model)")
    resume: Optional[str] = _field(None, "'latest' (needs --name) or a checkpoint path")
    save_frequency: int = _field(1, "save a checkpoint every N epochs (0: only at the end)")
    save_every_n_steps: Optional[int] = _field(None, "also save every N optimizer steps")
    keep_checkpoints: int = _field(3, "keep the last K checkpoints")
    log_every_n_steps: int = _field(10, "write a metrics line every N optimizer steps")
    report_to: str = _field("tensorboard", "'tensorboard' or '' / 'none'")
    progress: bool = _field(True, "progress bar on rank 0", negatable=True)
    # --- evaluation
    val_frequency: int = _field(1, "held-out retrieval every N epochs (synthetic data; 0: only before/after)")
    val_pairs: int = _field(256, "held-out (image, caption) pairs for retrieval (0: none)")
    zeroshot_frequency: int = _field(2, "zero-shot classification every N epochs (needs --imagenet-val)")
    imagenet_val: Optional[str] = _field(
        None, "ImageNet-style folder (one sub-folder per class) for zero-shot"
    )

    # ------------------------------------------------------------------ derived
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------- parsing
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m lcl_fast.train",
        description="Pre-train LCL. Without arguments: the built-in demo on the synthetic corpus.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        flags = [_flag(f.name), *meta.get("aliases", ())]
        if f.type in ("bool", bool):
            action = argparse.BooleanOptionalAction if meta.get("negatable") else "store_true"
            parser.add_argument(*flags, dest=f.name, action=action, default=f.default, help=meta["help"])
            continue
        kind = {"int": int, "float": float}.get(str(f.type).replace("Optional[", "").rstrip("]"), str)
        parser.add_argument(
            *flags, dest=f.name, type=kind, default=f.default, choices=meta.get("choices"), help=meta["help"]
        )
    add_debug_flag(parser)  # read by the error report (lcl_fast.errors), not part of the run's settings
    return parser


def parse_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Flags → a checked :class:`TrainConfig`. Bad flags exit with status 2 and one line naming them."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    args.pop("debug")
    cfg = TrainConfig(**args)
    try:
        validate(cfg)
    except ConfigError as err:
        parser.error(str(err))
    return cfg


# ---------------------------------------------------------------------- checks
def _positive(cfg: TrainConfig, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is None:
            continue
        if value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"{_flag(name)} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check_train_data(cfg: TrainConfig) -> None:
    """Every local shard ``--train-data`` names must exist (URLs and pipes are left to the reader)."""
    if cfg.dataset_type == "synthetic":
        if cfg.train_data not in SYNTHETIC_CORPORA:
            raise ConfigError(
                f"--train-data {cfg.train_data!r} with --dataset-type synthetic: give nothing "
                f"(image-caption pairs) or one of {[c for c in SYNTHETIC_CORPORA if c]}"
            )
        return
    if not cfg.train_data:
        raise ConfigError(
            f"--dataset-type {cfg.dataset_type} needs --train-data (a folder, a brace pattern "
            "such as shards/{00000..00099}.tar, or several joined by '::')"
        )
    from ..data.shards import expand_shards

    try:
        shards = expand_shards(cfg.train_data, cfg.dataset_type)
    except (ValueError, OSError, ImportError) as err:
        raise ConfigError(f"--train-data: {err}") from None
    local = [s for s in shards if "://" not in s and not s.startswith("pipe:")]
    missing = [s for s in local if not os.path.exists(s)]
    if missing:
        raise ConfigError(
            f"--train-data: {missing[0]} does not exist ({len(missing)} of {len(shards)} shards missing)"
        )


def validate(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` for the first setting that cannot work."""
    _positive(
        cfg,
        "batch_size",
        "accum_freq",
        "lr",
        "eps",
        "epochs",
        "steps",
        "keep_checkpoints",
        "log_every_n_steps",
        "max_nonfinite_steps",
        "save_every_n_steps",
        "interleaved_context_length",
        "num_img_token",
        "grad_clip_norm",
        "train_num_samples",
    )
    _positive(
        cfg,
        "shuffle_buffer",
        "wd",
        "warmup",
        "workers",
        "save_frequency",
        "val_frequency",
        "zeroshot_frequency",
        "val_pairs",
        allow_zero=True,
    )
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ConfigError(f"{_flag(name)} must lie in [0, 1), got {getattr(cfg, name)}")
    if not 0.0 <= cfg.img_first_prob <= 1.0:
        raise ConfigError(f"--img-first-prob must lie in [0, 1], got {cfg.img_first_prob}")
    if cfg.epochs is not None and cfg.steps is not None:
        raise ConfigError(f"give --epochs ({cfg.epochs}) or --steps ({cfg.steps}), not both")
    if cfg.lcl_generation_loss_weight < 0 or cfg.lcl_contrastive_loss_weight < 0:
        raise ConfigError("--lcl-generation-loss-weight and --lcl-contrastive-loss-weight must be >= 0")
    if cfg.compile_optimizer and not cfg.torchcompile:
        raise ConfigError("--compile-optimizer needs --torchcompile")
    if cfg.report_to not in ("", "none", "tensorboard"):
        raise ConfigError(f"--report-to {cfg.report_to!r}: only 'tensorboard' (or '' / 'none') is supported")
    _check_model(cfg)
    _check_paths(cfg)
    if cfg.optimizer == "apex_fused_adam" and cfg.fsdp:
        raise ConfigError(
            "--optimizer apex_fused_adam with --fsdp: apex's FusedAdam takes plain CUDA tensors and FSDP2's "
            "parameters are sharded DTensors; use --optimizer adamw (fused on CUDA)"
        )
    if cfg.optimizer == "apex_fused_adam" and not _apex_fused_adam_available():
        raise ConfigError(
            "--optimizer apex_fused_adam needs NVIDIA apex (github.com/NVIDIA/apex), "
            "which is not importable; use --optimizer adamw (fused on CUDA)"
        )


def _apex_fused_adam_available() -> bool:
    """NVIDIA apex's FusedAdam (not the unrelated PyPI package named ``apex``)."""
    try:
        return importlib.util.find_spec("apex.optimizers") is not None
    except ImportError:
        return False


def _check_model(cfg: TrainConfig) -> None:
    from ..model_configs import get_model_config  # no torch: `--help` stays fast

    try:
        model_cfg = get_model_config(cfg.model)
    except ValueError as err:
        raise ConfigError(f"--model: {err}") from None
    except OSError as err:
        raise ConfigError(f"--model {cfg.model}: cannot read it ({err})") from None
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    grid = vision.get("image_size", 224) // vision.get("patch_size", 16)
    context = text.get("context_length", 77)
    if cfg.num_img_token is not None and cfg.num_img_token != grid * grid:
        raise ConfigError(
            f"--num-img-token {cfg.num_img_token} does not fit --model {cfg.model}: its "
            f"{vision.get('image_size', 224)}px images in {vision.get('patch_size', 16)}px "
            f"patches give {grid * grid} tokens"
        )
    if cfg.interleaved_context_length is not None and cfg.interleaved_context_length > context:
        raise ConfigError(
            f"--interleaved-context-length {cfg.interleaved_context_length} exceeds the context "
            f"length {context} of --model {cfg.model}"
        )


def _check_paths(cfg: TrainConfig) -> None:
    _check_train_data(cfg)
    if cfg.resume is not None and cfg.resume != "latest" and not os.path.isfile(cfg.resume):
        raise ConfigError(f"--resume: {cfg.resume} is not a file (give a checkpoint path or 'latest')")
    if cfg.resume == "latest" and not cfg.name:
        raise ConfigError("--resume latest needs --name (the run folder to continue)")
    if cfg.pretrained is not None and not os.path.isfile(cfg.pretrained):
        raise ConfigError(f"--pretrained: {cfg.pretrained} is not a file")
    if cfg.imagenet_val is not None and not os.path.isdir(cfg.imagenet_val):
        raise ConfigError(f"--imagenet-val: {cfg.imagenet_val} is not a folder")
    if cfg.name is not None and (os.sep in cfg.name or cfg.name in (".", "..")):
        raise ConfigError(f"--name {cfg.name!r} must be a plain folder name")
