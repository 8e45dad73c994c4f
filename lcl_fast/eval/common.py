"""What every evaluation shares: model loading, features, image folders, image loading, tables, output.

Text features are taken as the reference takes them: ``<sot> text <eot>`` with ``<eot>`` turned
into ``<start_of_img>`` (cut texts keep it in the last slot); the feature is the normalised
``ln_final(h) @ text_projection`` there (``LCL.encode_text``). Rows are trimmed to their longest
real token before the text model runs: attention is causal, so trailing padding never changes
the feature, and trimming makes a 2048-token model's prompts cheap. On the Triton path the rows
are then padded up to a length bucket (:func:`text_bucket`), so that the attention kernels are
compiled and tuned for a few lengths, not for every new one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .._impl import resolve_impl
from ..errors import UserError, add_debug_flag

log = logging.getLogger("lcl_fast.eval")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".JPEG")

Autocast = Callable[[], AbstractContextManager]


class EvalInputError(UserError):
    """Unusable evaluation input (a missing folder, an empty class, malformed JSON); names the file."""


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------- features
@torch.no_grad()
def encode_images(
    model, images: torch.Tensor, *, batch_size: int = 256, autocast: Autocast = nullcontext
) -> torch.Tensor:
    """``images [N, 3, S, S]`` → normalised float32 features ``[N, E]``."""
    device = device_of(model)
    out = []
    for start in range(0, images.shape[0], batch_size):
        with autocast():
            feats = model.encode_image(images[start : start + batch_size].to(device), normalize=False)
        out.append(F.normalize(feats.float(), dim=-1))
    return torch.cat(out) if out else torch.zeros(0, model.embed_dim, device=device)


TEXT_BUCKET_MIN = 32  # the shortest bucket: one attention tile at the GPU tiles' sizes


def text_bucket(length: int, context_length: int) -> int:
    """The length evaluation runs ``length`` tokens at: the next power of two (at least
    :data:`TEXT_BUCKET_MIN`), at most ``context_length``."""
    return min(max(TEXT_BUCKET_MIN, 1 << max(length - 1, 0).bit_length()), context_length)


def _padded_length(model, ids: torch.Tensor, used: int, device: torch.device) -> int:
    """The columns of ``ids`` to run: ``used`` (its longest row), padded to :func:`text_bucket` where the
    text attention is the Triton kernel (it compiles and tunes per length; its trailing pad tiles are
    skipped, so the features are the same bits). The torch path runs ``used``: nothing to tune there,
    and its CPU kernels sum in a length-dependent order. A row without ``<end_of_text>`` gets its feature
    token in the last column (``LCL.encode_text``), which padding would move: such a batch runs unpadded
    (the tokenizer always writes one)."""
    if resolve_impl(getattr(model, "impl", "auto"), torch.empty(0, device=device)) != "triton":
        return used
    ends = (ids[:, :used] == model.eot_id) | (ids[:, :used] == model.soi_id)
    return text_bucket(used, ids.shape[1]) if bool(ends.any(1).all()) else used


@torch.no_grad()
def encode_texts(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    context_length: Optional[int] = None,
    batch_size: int = 256,
    autocast: Autocast = nullcontext,
) -> torch.Tensor:
    """Texts → normalised float32 features ``[N, E]`` at their ``<start_of_img>`` (see the module doc)."""
    device = device_of(model)
    context_length = context_length or model.text.context_length
    out = []
    for start in range(0, len(texts), batch_size):
        ids = tokenizer(list(texts[start : start + batch_size]), context_length)
        used = int((ids != 0).any(0).nonzero().max()) + 1 if ids.numel() else 1
        with autocast():
            feats = model.encode_text(ids[:, : _padded_length(model, ids, used, device)].to(device),
                                      normalize=False)
        out.append(F.normalize(feats.float(), dim=-1))
    return torch.cat(out) if out else torch.zeros(0, model.embed_dim, device=device)


# ---------------------------------------------------------------------- image files
def image_folder(root: Union[str, os.PathLike]) -> tuple[list[Path], list[int], list[str]]:
    """``(files, labels, class names)`` of an ImageNet-style folder (sub-folders sorted = class ids).

    ``classnames.txt`` beside the class folders (one name per line, in sorted-folder order)
    overrides the folder names. A missing folder, no class folders or a class without images
    raises :class:`EvalInputError` naming it.
    """
    root = Path(root)
    if not root.is_dir():
        raise EvalInputError(f"{root} is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise EvalInputError(f"{root} has no class sub-folders")
    names_file = root / "classnames.txt"
    if names_file.is_file():
        names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if len(names) != len(classes):
            raise EvalInputError(f"{names_file} lists {len(names)} names for {len(classes)} class folders")
    else:
        names = [c.replace("_", " ") for c in classes]
    files, labels = [], []
    for label, cls in enumerate(classes):
        found = [
            p
            for p in sorted((root / cls).iterdir())
            if p.suffix.lower() in IMAGE_EXTENSIONS or p.suffix in IMAGE_EXTENSIONS
        ]
        if not found:
            raise EvalInputError(f"class folder {root / cls} holds no images ({', '.join(IMAGE_EXTENSIONS[:5])}, ...)")
        files.extend(found)
        labels.extend([label] * len(found))
    return files, labels, names


def read_json(path: Union[str, os.PathLike]) -> object:
    """JSON from ``path``; a missing or malformed file raises :class:`EvalInputError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise EvalInputError(f"{path}: malformed JSON: {err}") from err


class ImageFiles(torch.utils.data.Dataset):
    """Image files → ``(index, uint8 [S, S, 3] or None)`` with the eval transform (resize, center crop).

    An image that cannot be read or decoded gives None; :func:`load_images` skips and counts it.
    """

    def __init__(self, files: Sequence[Union[str, os.PathLike]], image_size: int):
        self.files = [Path(f) for f in files]
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from ..data.decode import pil_decode

        try:
            return i, pil_decode(self.files[i].read_bytes(), self.image_size, False, 0), ""
        except (OSError, ValueError) as err:
            return i, None, f"{self.files[i]}: {err}"


def _collate(items):
    good = [(i, a) for i, a, _ in items if a is not None]
    bad = [msg for _, a, msg in items if a is None]
    idx = torch.tensor([i for i, _ in good], dtype=torch.long)
    arr = torch.from_numpy(np.stack([a for _, a in good])) if good else None
    return idx, arr, bad


def load_images(
    files: Sequence[Union[str, os.PathLike]],
    image_size: int,
    *,
    batch_size: int = 256,
    workers: int = 2,
    device: Union[str, torch.device] = "cpu",
    progress: Optional[str] = None,
):
    """Yield ``(indices [n], images [n, 3, S, S] float32 normalised on device)`` batches, decoded by
    ``workers`` processes; undecodable files are skipped and counted in the returned ``skipped`` dict
    (filled as the generator runs).

    For a model on the CPU, only the cores that torch's threads leave free get decoding workers
    (:func:`decode_workers`)."""
    from ..data.decode import normalize_uint8

    skipped: dict[str, int] = {"image_decode": 0}
    loader = torch.utils.data.DataLoader(
        ImageFiles(files, image_size),
        batch_size=batch_size,
        num_workers=decode_workers(workers, device),
        collate_fn=_collate,
        persistent_workers=False,
    )

    def batches():
        bar = progress_bar(len(files), progress) if progress else None
        for idx, arr, bad in loader:
            for msg in bad:
                if skipped["image_decode"] < 3:
                    log.warning("skipped an image that cannot be decoded: %s", msg)
                skipped["image_decode"] += 1
            if bar is not None:
                bar.update(len(idx) + len(bad))
            if arr is not None:
                yield idx, normalize_uint8(arr, device)
        if bar is not None:
            bar.close()

    return batches(), skipped


def decode_workers(workers: int, device: Union[str, torch.device]) -> int:
    """Decoding processes to start beside a model on ``device``.

    On the CPU the model's forward already runs ``torch.get_num_threads()`` threads; a decoding
    process on one of those cores makes every parallel op wait for the thread it preempts. Measured
    on a 2-core VM (probe features, B/32 tower at 2 layers, 64 JPEGs 500x375): decoding in the main
    process 0.69 s, 2 workers 0.85 s, model alone 0.48 s. So on the CPU ``workers`` is capped at the
    cores left free; with a CUDA model every worker is kept.
    """
    if workers <= 0 or torch.device(device).type != "cpu":
        return max(0, workers)
    free = max(0, (os.cpu_count() or 1) - torch.get_num_threads())
    if free < workers:
        log.info("decoding with %d worker process(es), not %d: the CPU model's %d threads use the other cores",
                 free, workers, torch.get_num_threads())
    return min(workers, free)


def progress_bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, leave=False)


# ---------------------------------------------------------------------- command line plumbing
def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="LCL_tiny", help="registered model name or JSON config path")
    p.add_argument(
        "--pretrained",
        default=None,
        help="checkpoint (training checkpoint or state dict); without it, the fixed-seed initialisation",
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="image-decoding processes (with a CPU model: at most the cores its threads leave free)",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--precision", default="auto", choices=("auto", "fp32", "amp_bf16", "amp"), help="auto: amp_bf16 on CUDA"
    )
    p.add_argument(
        "--output",
        default=None,
        help="write the results as JSON to this file (default: <run>/eval/<command>_<step>.json when "
        "--pretrained is a checkpoint in a run's checkpoints/ folder; else nothing is written)",
    )
    add_debug_flag(p)


def run_folder_output(pretrained: Optional[str], command: str) -> Optional[str]:
    """Where results go without ``--output``: ``<run>/eval/<command>_<checkpoint stem>.json`` when the
    checkpoint lies in a training run's ``checkpoints/`` folder, else None (nothing is written)."""
    if not pretrained:
        return None
    ckpt = Path(pretrained).resolve()
    if ckpt.parent.name != "checkpoints":
        return None
    return str(ckpt.parent.parent / "eval" / f"{command}_{ckpt.stem}.json")


def load_model(args: argparse.Namespace):
    """``(model in eval mode, tokenizer, device, autocast)`` from ``--model/--pretrained/--device/--precision``."""
    from ..data import get_tokenizer
    from ..factory import create_model

    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    if args.pretrained is not None and not Path(args.pretrained).is_file():
        raise EvalInputError(f"--pretrained {args.pretrained}: no such file")
    torch.manual_seed(0)  # without a checkpoint: the same initialisation every time
    model = create_model(args.model, pretrained=args.pretrained, device=device).eval()
    precision = args.precision
    if precision == "auto":
        precision = "amp_bf16" if device.type == "cuda" else "fp32"
    dtype = {"amp_bf16": torch.bfloat16, "amp": torch.float16}.get(precision)
    autocast = partial(torch.autocast, device.type, dtype=dtype) if dtype else nullcontext
    tokenizer = get_tokenizer(context_length=model.text.context_length)
    return model, tokenizer, device, autocast


def print_table(title: str, rows: Sequence[tuple[str, object]]) -> None:
    """A two-column table on stdout."""
    shown = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in rows]
    width = max([len(k) for k, _ in shown], default=0)
    rule = "-" * (width + 2 + max([len(v) for _, v in shown], default=0))
    lines = [title, rule, *[f"{k:<{width}}  {v}" for k, v in shown]]
    print("\n".join(lines), flush=True)


def write_output(path: Optional[str], results: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=2) + "\n")
