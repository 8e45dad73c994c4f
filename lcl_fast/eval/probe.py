"""Classification from the frozen encoder: an attentive probe (the paper's protocol) or a linear probe.

- ``attentive`` (default): a learned query attends over the frozen ViT's patch tokens
  (``model.visual(images)``: ``[N, grid², width]``, after ``ln_post``), then LayerNorm and a linear
  head. The encoder never changes; only the probe learns.
- ``linear``: a linear head on the pooled feature (``model.encode_image``, unnormalised, standardised
  with the training set's mean and deviation).

Frozen features are computed once per (checkpoint, data) and cached on disk
(``$LCL_FAST_CACHE/probe_features/<key>/``: ``tokens.npy`` float16 ``[N, P, W]``, ``pooled.npy``,
``labels.npy``), written and read back memory-mapped (the features of a large set need not fit
in memory). The key hashes the model config, the checkpoint's path,
size and modification time, the image size and every image's path, size and modification time.
Training: AdamW, cosine schedule with a short linear warm-up, cross-entropy.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import tarfile
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import Autocast, EvalInputError, device_of, image_folder, load_images, log

PROBES = ("attentive", "linear")
_CACHE_VERSION = 1


# ---------------------------------------------------------------------- frozen features
@torch.no_grad()
def frozen_features(model, images: torch.Tensor, autocast: Autocast = nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """``images [n, 3, S, S]`` → (patch tokens ``[n, P, W]`` float16, pooled ``[n, E]`` float32)."""
    with autocast():
        tokens = model.visual(images)
        pooled, _ = model.pool_project(tokens)
    return tokens.to(torch.float16), pooled.float()


@torch.no_grad()
def features_of_images(
    model, images: torch.Tensor, *, batch_size: int = 256, autocast: Autocast = nullcontext
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-memory images ``[N, 3, S, S]`` → (tokens ``[N, P, W]`` float16, pooled ``[N, E]``) on the CPU."""
    device = device_of(model)
    toks, pools = [], []
    for start in range(0, images.shape[0], batch_size):
        t, p = frozen_features(model, images[start : start + batch_size].to(device), autocast)
        toks.append(t.cpu())
        pools.append(p.cpu())
    return torch.cat(toks), torch.cat(pools)


def _file_stamp(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def feature_cache_key(model_id: dict, files: Sequence[Path], labels: Sequence[int], image_size: int) -> str:
    """A hash of the model (config, checkpoint stamp), the files (path, size, mtime) and the labels."""
    h = hashlib.sha256()
    h.update(json.dumps({"v": _CACHE_VERSION, "model": model_id, "image_size": image_size}, sort_keys=True).encode())
    for f, y in zip(files, labels):
        h.update(json.dumps([*_file_stamp(Path(f)), int(y)]).encode())
    return h.hexdigest()[:24]


@torch.no_grad()
def extract_features(
    model,
    files: Sequence[Path],
    labels: Sequence[int],
    *,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    model_id: Optional[dict] = None,
    batch_size: int = 256,
    workers: int = 2,
    autocast: Autocast = nullcontext,
    progress: Optional[str] = "features",
) -> dict:
    """``{"tokens", "pooled", "labels", "skipped", "cached"}`` of image files, from the cache when there.

    ``model_id`` (anything JSON that identifies the weights) enables the cache under ``cache_dir``;
    undecodable images are skipped and counted.
    """
    size = model.vision_cfg.image_size
    folder = None
    if model_id is not None and cache_dir is not None:
        folder = Path(cache_dir) / feature_cache_key(model_id, files, labels, size)
        if (folder / "meta.json").is_file():
            return _load_cached(folder, cached=True)
    device = device_of(model)
    batches, skipped = load_images(
        files, size, batch_size=batch_size, workers=workers, device=device, progress=progress
    )
    tmp = None
    if folder is not None:  # written aside, then renamed: a concurrent reader never sees half a cache
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        kept, toks, pools = [], [], []
        filled = 0
        for idx, images in batches:
            t, p = (a.cpu().numpy() for a in frozen_features(model, images, autocast))
            kept.append(idx)
            if tmp is None:
                toks.append(t)
                pools.append(p)
            else:  # straight to disk, memory-mapped: the features of a large set need not fit in memory
                if not toks:
                    toks.append(
                        np.lib.format.open_memmap(tmp / "tokens.npy", "w+", np.float16, (len(files), *t.shape[1:]))
                    )
                    pools.append(
                        np.lib.format.open_memmap(tmp / "pooled.npy", "w+", np.float32, (len(files), p.shape[1]))
                    )
                toks[0][filled : filled + len(t)] = t
                pools[0][filled : filled + len(p)] = p
            filled += len(t)
        if not kept:
            raise EvalInputError(
                f"none of the {len(files)} images could be decoded (first: {files[0] if files else None})"
            )
        order = torch.cat(kept).numpy()
        out_labels = np.asarray(labels, dtype=np.int64)[order]
        if tmp is None:
            return {
                "tokens": np.concatenate(toks),
                "pooled": np.concatenate(pools),
                "labels": out_labels,
                "skipped": skipped["image_decode"],
                "cached": False,
            }
        for arr in (*toks, *pools):
            arr.flush()
        del toks, pools
        np.save(tmp / "labels.npy", out_labels)
        meta = {"skipped": skipped["image_decode"], "n": filled, "model": model_id}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "meta.json").is_file():  # not another process's finished cache: a real error
                raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return _load_cached(folder, cached=False)


def _load_cached(folder: Path, cached: bool) -> dict:
    """A feature cache folder, memory-mapped (rows past ``n`` belong to skipped images: never written)."""
    meta = json.loads((folder / "meta.json").read_text())
    n = meta["n"]
    return {
        "tokens": np.load(folder / "tokens.npy", mmap_mode="r")[:n],
        "pooled": np.load(folder / "pooled.npy", mmap_mode="r")[:n],
        "labels": np.load(folder / "labels.npy"),
        "skipped": meta["skipped"],
        "cached": cached,
    }


# ---------------------------------------------------------------------- probes
class AttentiveProbe(nn.Module):
    """A learned query attends over patch tokens ``[N, P, W]`` → LayerNorm → linear head ``[N, C]``."""

    def __init__(self, width: int, num_classes: int, heads: Optional[int] = None):
        super().__init__()
        heads = heads or max(1, width // 64)
        while width % heads:
            heads -= 1
        self.norm = nn.LayerNorm(width)
        self.query = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.out_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm(tokens)
        pooled, _ = self.attn(self.query.expand(x.shape[0], -1, -1), x, x, need_weights=False)
        return self.head(self.out_norm(pooled[:, 0]))


class LinearProbe(nn.Module):
    """A linear head on standardised pooled features ``[N, E]``."""

    def __init__(self, dim: int, num_classes: int, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.head((pooled - self.mean) / self.std)


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def train_probe(
    train: dict,
    val: dict,
    num_classes: int,
    *,
    probe: str = "attentive",
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 256,
    weight_decay: float = 1e-4,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
    progress: bool = False,
) -> dict:
    """Train a probe on ``train`` features (``{"tokens"|"pooled", "labels"}``), score it on ``val``.

    Returns ``top1``, ``top5`` (top-k with k = min(5, classes)), ``chance``, ``num_classes``,
    ``probe``, ``epochs``, ``num_train``, ``num_val``.
    """
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    key = "tokens" if probe == "attentive" else "pooled"
    x_train, y_train = train[key], _as_tensor(train["labels"]).long()
    n = len(y_train)
    if n == 0 or len(val["labels"]) == 0:
        raise ValueError("the probe needs training and validation images")
    gen = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):  # a seeded head, the caller's random state untouched
        torch.manual_seed(seed)
        if probe == "attentive":
            head: nn.Module = AttentiveProbe(x_train.shape[-1], num_classes)
        else:
            pooled = _as_tensor(x_train).float()
            head = LinearProbe(pooled.shape[-1], num_classes, pooled.mean(0), pooled.std(0).clamp_min(1e-6))
    head = head.to(device)
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = max(1, epochs * steps_per_epoch)
    warmup = min(total // 10, steps_per_epoch)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    from ..training.optim import cosine_with_warmup

    scheduler = cosine_with_warmup(optimizer, max(warmup, 1), total)

    def batch(x, idx: torch.Tensor) -> torch.Tensor:
        rows = np.sort(idx.numpy()) if not isinstance(x, torch.Tensor) else idx
        part = x[rows] if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x[rows]))
        return part.to(device, torch.float32), rows

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"{probe} probe", unit="step", dynamic_ncols=True, leave=False)
    head.train()
    with torch.enable_grad():  # callers may evaluate under no_grad; the probe itself learns
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, batch_size):
                xb, rows = batch(x_train, perm[start : start + batch_size])
                yb = y_train[torch.as_tensor(rows)].to(device)
                loss = F.cross_entropy(head(xb), yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    head.eval()
    x_val, y_val = val[key], _as_tensor(val["labels"]).long()
    k = min(5, num_classes)
    hits1 = hits5 = 0
    with torch.no_grad():
        for start in range(0, len(y_val), 1024):
            idx = torch.arange(start, min(start + 1024, len(y_val)))
            xb, _ = batch(x_val, idx)
            top = head(xb).topk(k, dim=1).indices.cpu()
            target = y_val[idx]
            hits1 += int((top[:, 0] == target).sum())
            hits5 += int((top == target[:, None]).any(1).sum())
    return {
        "top1": hits1 / len(y_val),
        "top5": hits5 / len(y_val),
        "chance": 1.0 / num_classes,
        "num_classes": num_classes,
        "probe": probe,
        "epochs": epochs,
        "num_train": n,
        "num_val": len(y_val),
    }


def evaluate_probe_folders(
    model,
    train_folder: Union[str, os.PathLike],
    val_folder: Union[str, os.PathLike],
    *,
    probe: str = "attentive",
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 256,
    workers: int = 2,
    autocast: Autocast = nullcontext,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    model_id: Optional[dict] = None,
    progress: bool = True,
) -> dict:
    """The probe protocol on two ImageNet-style folders with the same class sub-folders."""
    train_files, train_labels, names = image_folder(train_folder)
    val_files, val_labels, val_names = image_folder(val_folder)
    if sorted(p.name for p in Path(train_folder).iterdir() if p.is_dir()) != sorted(
        p.name for p in Path(val_folder).iterdir() if p.is_dir()
    ):
        raise EvalInputError(f"{train_folder} and {val_folder} must hold the same class sub-folders")
    common = dict(cache_dir=cache_dir, model_id=model_id, batch_size=batch_size, workers=workers, autocast=autocast)
    train = extract_features(
        model, train_files, train_labels, progress="train features" if progress else None, **common
    )
    val = extract_features(model, val_files, val_labels, progress="val features" if progress else None, **common)
    out = train_probe(
        train,
        val,
        len(names),
        probe=probe,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        device=device_of(model),
        progress=progress,
    )
    out["skipped"] = train["skipped"] + val["skipped"]
    out["features_cached"] = bool(train["cached"] and val["cached"])
    if out["skipped"]:
        log.warning("probe: skipped %d images that cannot be decoded", out["skipped"])
    return out


# ---------------------------------------------------------------------- the built-in corpus
def _read_wds(path: Path) -> list[dict]:
    """Every sample of a (small) webdataset tar as ``{ext: bytes}``, in order."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return list(samples.values())


@functools.lru_cache(maxsize=4)
def _builtin_split_cached(root: str, image_size: int, num_train: int):
    from ..data.decode import decode_batch
    from ..data.synthetic import COLORS, SHAPES

    classes = [f"{c} {s}" for c in COLORS for s in SHAPES]

    def load(paths: list[Path], limit: Optional[int]):
        samples = [s for p in paths for s in _read_wds(p)][:limit]
        labels = []
        for s in samples:
            meta = json.loads(s["json"])
            labels.append(classes.index(f"{meta['color']} {meta['shape']}"))
        images = decode_batch([s["jpg"] for s in samples], image_size, train=False, backend="pil")
        return images, torch.tensor(labels), [json.loads(s["json"])["caption"] for s in samples]

    base = Path(root)
    train = load(sorted((base / "pairs").glob("*.tar")), num_train)
    val = load(sorted((base / "eval").glob("*.tar")), None)
    return train, val, tuple(classes)


def builtin_split(image_size: int, num_train: int = 512, cache_dir: Optional[str] = None):
    """The built-in corpus as a classification task (colour × shape, 18 classes, from its metadata):
    ``((train images, labels, captions), (val images, labels, captions), class names)``; training
    images from the training pairs, validation from the held-out pairs. Cached per process."""
    from ..data.synthetic import ensure_corpus

    return _builtin_split_cached(str(ensure_corpus(cache_dir)), image_size, num_train)


def builtin_probe(
    model,
    *,
    num_train: int = 512,
    probe: str = "attentive",
    epochs: int = 8,
    lr: float = 3e-3,
    batch_size: int = 64,
    autocast: Autocast = nullcontext,
) -> dict:
    """The probe protocol on the built-in corpus (see :func:`builtin_split`), features in memory."""
    (x_tr, y_tr, _), (x_va, y_va, _), classes = builtin_split(model.vision_cfg.image_size, num_train)
    tok_tr, pool_tr = features_of_images(model, x_tr, autocast=autocast)
    tok_va, pool_va = features_of_images(model, x_va, autocast=autocast)
    return train_probe(
        {"tokens": tok_tr, "pooled": pool_tr, "labels": y_tr},
        {"tokens": tok_va, "pooled": pool_va, "labels": y_va},
        len(classes),
        probe=probe,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        device=device_of(model),
    )
