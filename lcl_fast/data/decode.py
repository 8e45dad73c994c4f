"""Image decoding and augmentation: DALI (GPU ``mixed`` or CPU) or PIL, one transform semantics.

Training: random resized crop (scale 0.9–1.0, ratio 3/4–4/3, bicubic) to ``image_size``; eval:
resize the shorter side to ``image_size`` (bicubic) and center crop; then RGB, scaled to [0, 1]
and normalised with CLIP's mean and std (open_clip's ``image_transform``).

The crop window is drawn on the host with torchvision's ``RandomResizedCrop.get_params``
algorithm from a per-image seed, so both backends crop the same window, and a resumed run
crops as the uninterrupted one did. PIL crops then resizes (as torchvision does on PIL images);
DALI decodes the whole batch in one pipeline (``fn.decoders.image``, then ``fn.resize`` of the
window given as ``roi_start``/``roi_end`` through ``external_source``, cubic, antialiased, then
``fn.crop_mirror_normalize``), with ``device="mixed"`` on CUDA and CPU operators
(``device_id=None``) otherwise. The two agree to a few 1/255 steps (different cubic kernels).

``decode_batch(images, image_size, train=True, backend="dali"|"pil"|"auto")`` is the standalone
entry (benchmarks; ``"auto"`` is DALI on CUDA, PIL on the CPU: see :func:`resolve_backend`); the
loader uses :func:`prepare_image` (host side) and :class:`BatchDecoder`.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import logging
import math
import os
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image

log = logging.getLogger("lcl_fast.data")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TRAIN_SCALE = (0.9, 1.0)
TRAIN_RATIO = (3.0 / 4.0, 4.0 / 3.0)
BACKENDS = ("auto", "dali", "pil")
# PIL format names DALI's decoder reads; anything else (GIF, ...) is decoded by PIL on the host.
DALI_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "TIFF", "JPEG2000", "PPM"})

Window = tuple[int, int, int, int]  # top, left, height, width in source pixels


@functools.cache
def dali_available() -> bool:
    """Whether NVIDIA DALI can be imported (checked once, without importing it)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError, AttributeError):  # no "nvidia" package, or a broken one
        return False


_said: set[str] = set()


def _say_once(key: str, message: str) -> None:
    if key not in _said:
        _said.add(key)
        log.info(message)


def resolve_backend(backend: str, device: Union[str, torch.device] = "cpu") -> str:
    """``"auto"`` -> ``"dali"`` for a CUDA ``device`` when DALI is installed, else ``"pil"``.

    On the CPU ``"auto"`` picks PIL even with DALI installed: DALI's CPU operators decoded and
    resized fewer images per second than PIL on our 2-core machine (and PIL also runs in every
    data-loader worker); ``"dali"`` forces them. The choice of PIL is said once in the log.
    """
    if backend not in BACKENDS:
        raise ValueError(f"decoder backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "dali" and not dali_available():
        raise ImportError("decoder='dali' needs NVIDIA DALI: pip install nvidia-dali-cuda120")
    if backend != "auto":
        return backend
    if not dali_available():
        _say_once(
            "no-dali",
            "NVIDIA DALI is not installed: decoding images with PIL (pip install nvidia-dali-cuda120)",
        )
        return "pil"
    if torch.device(device).type != "cuda":
        _say_once(
            "cpu", "decoding images with PIL on the CPU (decoder='dali' would use DALI's CPU operators)"
        )
        return "pil"
    return "dali"


def random_resized_crop_window(
    width: int, height: int, rng: random.Random, scale=TRAIN_SCALE, ratio=TRAIN_RATIO
) -> Window:
    """torchvision's ``RandomResizedCrop.get_params``: 10 tries of area and log-uniform aspect,
    then the largest center crop of an allowed aspect ratio."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def eval_resize_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision ``Resize(size)``: the shorter side becomes ``size`` -> ``(new_width, new_height)``."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def eval_crop_offsets(new_width: int, new_height: int, size: int) -> tuple[int, int]:
    """torchvision ``CenterCrop``: ``(top, left)`` in the resized image."""
    return int(round((new_height - size) / 2.0)), int(round((new_width - size) / 2.0))


def eval_roi(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """The eval center crop as a window of the source image (``y0, x0, y1, x1``, fractional):
    resizing that window to ``size`` samples the same points as resize-then-crop."""
    nw, nh = eval_resize_shape(width, height, size)
    top, left = eval_crop_offsets(nw, nh, size)
    sy, sx = height / nh, width / nw
    return top * sy, left * sx, (top + size) * sy, (left + size) * sx


def _open_rgb(data: bytes) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except Exception as e:  # PIL raises many types for bad data (OSError, SyntaxError, ValueError, ...)
        raise ValueError(f"cannot decode image ({len(data)} bytes): {e}") from e


def pil_transform(img: Image.Image, image_size: int, train: bool, rng: Optional[random.Random]) -> np.ndarray:
    """``[image_size, image_size, 3]`` uint8 of an RGB PIL image (crop + bicubic resize)."""
    if train:
        top, left, h, w = random_resized_crop_window(img.width, img.height, rng or random.Random(0))
        img = img.crop((left, top, left + w, top + h)).resize((image_size, image_size), Image.BICUBIC)
    else:
        nw, nh = eval_resize_shape(img.width, img.height, image_size)
        if (nw, nh) != img.size:
            img = img.resize((nw, nh), Image.BICUBIC)
        top, left = eval_crop_offsets(nw, nh, image_size)
        img = img.crop((left, top, left + image_size, top + image_size))
    return np.asarray(img, dtype=np.uint8)


def pil_decode(data: bytes, image_size: int, train: bool, seed: int) -> np.ndarray:
    """Decode + transform one encoded image with PIL; ``ValueError`` if it cannot be decoded."""
    return pil_transform(_open_rgb(data), image_size, train, random.Random(seed))


class Encoded:
    """An image left for DALI: its bytes and crop window (``y0, x0, y1, x1`` in source pixels)."""

    __slots__ = ("data", "roi")

    def __init__(self, data: bytes, roi: tuple[float, float, float, float]):
        self.data = data
        self.roi = roi


def prepare_image(
    data: bytes, image_size: int, train: bool, seed: int, backend: str
) -> Union[np.ndarray, Encoded]:
    """Host-side work for one image of a sample; ``ValueError`` if it is unusable.

    ``"pil"``: the decoded, transformed ``uint8 [S, S, 3]`` array. ``"dali"``: the header is read
    (size, format) to draw the crop window; the bytes go to DALI as :class:`Encoded`. A format DALI
    cannot read is decoded with PIL here.
    """
    if backend == "pil":
        return pil_decode(data, image_size, train, seed)
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, (width, height) = img.format, img.size
    except Exception as e:
        raise ValueError(f"cannot read image header ({len(data)} bytes): {e}") from e
    if fmt not in DALI_FORMATS or width < 1 or height < 1:
        return pil_decode(data, image_size, train, seed)
    if train:
        top, left, h, w = random_resized_crop_window(width, height, random.Random(seed))
        return Encoded(data, (float(top), float(left), float(top + h), float(left + w)))
    return Encoded(data, eval_roi(width, height, image_size))


def normalize_uint8(images: torch.Tensor, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """``uint8 [n, S, S, 3]`` -> normalised ``float32 [n, 3, S, S]`` on ``device`` (ToTensor + Normalize).

    On the CPU this runs in numpy, single-threaded: torch's intra-op threads gain nothing on
    tensors this small and stall badly when the cores are busy (the same float32 operations)."""
    device = torch.device(device)
    if device.type == "cpu":
        out = np.empty((images.shape[0], 3, *images.shape[1:3]), dtype=np.float32)
        out[...] = images.numpy().transpose(0, 3, 1, 2)
        out /= np.float32(255.0)
        out -= np.array(CLIP_MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
        out /= np.array(CLIP_STD, dtype=np.float32).reshape(1, 3, 1, 1)
        return torch.from_numpy(out)
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std).contiguous()


class DaliDecoder:
    """One DALI pipeline: decode -> resize(window) -> normalise, for batches of encoded images.

    ``device`` CUDA: ``mixed`` decoding and GPU operators on that device; else CPU operators.
    Batches larger than ``max_batch_size`` run in chunks. ``__call__`` returns the images and the
    indices of those DALI could not decode (decoded one by one after a failed batch).
    """

    def __init__(
        self,
        image_size: int,
        device: Union[str, torch.device] = "cpu",
        num_threads: Optional[int] = None,
        max_batch_size: int = 256,
    ):
        from nvidia import dali
        from nvidia.dali import fn, types

        self.image_size = image_size
        self.device = torch.device(device)
        self.gpu = self.device.type == "cuda"
        self.max_batch_size = max_batch_size
        threads = num_threads or max(1, min(8, os.cpu_count() or 1))
        device_id = (
            (self.device.index if self.device.index is not None else torch.cuda.current_device())
            if self.gpu
            else None
        )
        mean = [255.0 * m for m in CLIP_MEAN]
        std = [255.0 * s for s in CLIP_STD]

        @dali.pipeline_def(
            batch_size=max_batch_size,
            num_threads=threads,
            device_id=device_id,
            prefetch_queue_depth=1,
            seed=0,
        )
        def pipeline():
            data = fn.external_source(name="data", dtype=types.UINT8, ndim=1)
            roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
            roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
            images = fn.decoders.image(
                data, device="mixed" if self.gpu else "cpu", output_type=types.RGB, adjust_orientation=False
            )  # PIL does not apply EXIF rotation either
            images = fn.resize(
                images,
                size=[image_size, image_size],
                roi_start=roi_start,
                roi_end=roi_end,
                interp_type=types.INTERP_CUBIC,
                antialias=True,
            )
            return fn.crop_mirror_normalize(
                images, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std
            )

        self._pipe = pipeline()
        self._pipe.build()

    def _run(self, items: Sequence[Encoded]) -> torch.Tensor:
        pipe = self._pipe
        pipe.feed_input("data", [np.frombuffer(it.data, dtype=np.uint8) for it in items])
        pipe.feed_input("roi_start", [np.array(it.roi[:2], dtype=np.float32) for it in items])
        pipe.feed_input("roi_end", [np.array(it.roi[2:], dtype=np.float32) for it in items])
        (out,) = pipe.run()
        dense = out.as_tensor()
        if self.gpu:
            from nvidia.dali.plugin.pytorch import feed_ndarray

            result = torch.empty(dense.shape(), dtype=torch.float32, device=self.device)
            feed_ndarray(dense, result, cuda_stream=torch.cuda.current_stream(self.device))
            return result
        return torch.from_numpy(np.array(dense, copy=True))

    def __call__(self, items: Sequence[Encoded]) -> tuple[torch.Tensor, list[int]]:
        size = self.image_size
        outs: list[torch.Tensor] = []
        failed: list[int] = []
        for start in range(0, len(items), self.max_batch_size):
            chunk = items[start : start + self.max_batch_size]
            try:
                outs.append(self._run(chunk))
                continue
            except RuntimeError:
                pass  # one bad image fails the whole batch: find it
            for k, item in enumerate(chunk):
                try:
                    outs.append(self._run([item]))
                except RuntimeError:
                    failed.append(start + k)
        if not outs:
            return torch.empty(0, 3, size, size, device=self.device), failed
        return torch.cat(outs), failed


@functools.lru_cache(maxsize=8)
def _dali_decoder(image_size: int, device: str, num_threads: Optional[int]) -> DaliDecoder:
    return DaliDecoder(image_size, device, num_threads)


def get_dali_decoder(
    image_size: int, device: Union[str, torch.device] = "cpu", num_threads: Optional[int] = None
) -> DaliDecoder:
    """A cached :class:`DaliDecoder` (building a pipeline takes a moment)."""
    return _dali_decoder(image_size, str(torch.device(device)), num_threads)


class BatchDecoder:
    """Finishes a loader batch's images: prepared items (arrays or :class:`Encoded`) -> normalised
    ``float32 [n, 3, S, S]`` on ``device`` in the same order, plus the indices that failed."""

    def __init__(
        self, image_size: int, device: Union[str, torch.device] = "cpu", num_threads: Optional[int] = None
    ):
        self.image_size = image_size
        self.device = torch.device(device)
        self.num_threads = num_threads

    def __call__(self, items: Sequence[Union[np.ndarray, Encoded]]) -> tuple[torch.Tensor, list[int]]:
        size = self.image_size
        arrays = [k for k, it in enumerate(items) if not isinstance(it, Encoded)]
        encoded = [k for k, it in enumerate(items) if isinstance(it, Encoded)]
        parts: list[tuple[list[int], torch.Tensor]] = []  # (item indices, their images)
        if arrays:
            stacked = torch.from_numpy(np.stack([items[k] for k in arrays]))
            parts.append((arrays, normalize_uint8(stacked, self.device)))
        failed: list[int] = []
        if encoded:
            decoded, bad = get_dali_decoder(size, self.device, self.num_threads)([items[k] for k in encoded])
            bad_set = set(bad)
            parts.append(([k for j, k in enumerate(encoded) if j not in bad_set], decoded.to(self.device)))
            failed = [encoded[j] for j in bad]
        if not parts:
            return torch.empty(0, 3, size, size, device=self.device), failed
        if len(parts) == 1:  # the usual case: one backend, nothing to interleave
            return parts[0][1], failed
        order = [k for idx, _ in parts for k in idx]
        images = torch.cat([t for _, t in parts])
        rank = {k: r for r, k in enumerate(order)}
        return images[[rank[k] for k in sorted(order)]], sorted(failed)


def decode_batch(
    images: Sequence[bytes],
    image_size: int,
    train: bool = True,
    backend: str = "auto",
    *,
    seeds: Optional[Sequence[int]] = None,
    device: Union[str, torch.device] = "cpu",
    num_threads: Optional[int] = None,
) -> torch.Tensor:
    """Decode and transform encoded images -> normalised ``float32 [n, 3, S, S]`` on ``device``.

    ``backend``: ``"dali"`` (``mixed`` on a CUDA ``device``, CPU operators otherwise), ``"pil"``
    (a thread pool of ``num_threads``), or ``"auto"`` (:func:`resolve_backend`). ``seeds[i]`` draws
    image ``i``'s crop window (default ``i``). Raises ``ValueError`` naming the first image that
    cannot be decoded.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    backend = resolve_backend(backend, device)
    seeds = list(range(len(images))) if seeds is None else list(seeds)
    if len(seeds) != len(images):
        raise ValueError(f"got {len(seeds)} seeds for {len(images)} images")
    threads = num_threads or max(1, min(8, os.cpu_count() or 1))

    def prepare(k: int):
        try:
            return prepare_image(images[k], image_size, train, seeds[k], backend)
        except ValueError as e:
            raise ValueError(f"image {k}: {e}") from e

    if backend == "pil" and threads > 1 and len(images) > 1:
        with ThreadPoolExecutor(threads) as pool:  # PIL releases the GIL while decoding and resizing
            items = list(pool.map(prepare, range(len(images))))
    else:
        items = [prepare(k) for k in range(len(images))]
    out, failed = BatchDecoder(image_size, device, num_threads)(items)
    if failed:
        raise ValueError(f"image {failed[0]} could not be decoded ({len(failed)} of {len(images)} failed)")
    return out


def eval_images(
    images: Union[torch.Tensor, Sequence], image_size: int, device: Union[str, torch.device] = "cpu"
) -> torch.Tensor:
    """A normalised ``float32 [N, 3, S, S]`` batch (the eval transform) from PIL images, encoded bytes or
    file paths; a tensor is returned as it is. What :func:`lcl_fast.caption` decodes its images with."""
    if isinstance(images, torch.Tensor):
        return images
    encoded = []
    for item in images:
        if isinstance(item, (bytes, bytearray)):
            encoded.append(bytes(item))
        elif isinstance(item, (str, os.PathLike)):
            with open(item, "rb") as f:
                encoded.append(f.read())
        else:  # a PIL image
            buf = io.BytesIO()
            item.convert("RGB").save(buf, format="PNG")
            encoded.append(buf.getvalue())
    return decode_batch(encoded, image_size, train=False, backend="pil", device=device)
