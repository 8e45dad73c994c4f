"""Helpers for the data tests: a word-level fake tokenizer and writers of tiny shards."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

SOT, EOT, IMG, SOI, EOI = 49406, 49407, 49408, 49409, 49410


class FakeTokenizer:
    """Whitespace words -> stable ids in [1, 40000]; the image token strings map to their ids."""

    sot_token_id, eot_token_id, img_token_id, soi_token_id, eoi_token_id, pad_token_id = (
        SOT,
        EOT,
        IMG,
        SOI,
        EOI,
        0,
    )
    _special = {"<img_placehold>": IMG, "<start_of_img>": SOI, "<end_of_img>": EOI}

    def encode(self, text: str) -> list[int]:
        return [self._special.get(w, 1 + zlib.crc32(w.encode()) % 40000) for w in text.lower().split()]


def image_bytes(width: int = 24, height: int = 20, seed: int = 0, fmt: str = "JPEG") -> bytes:
    """A small smooth picture (so JPEG and the resamplers behave like on photos)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    phase = rng.uniform(0, 6, size=3)
    channels = [128 + 100 * np.sin(xx / (3 + k) + yy / (4 + k) + phase[k]) for k in range(3)]
    arr = np.stack(channels, -1).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def truncated_jpeg(seed: int = 0) -> bytes:
    """A JPEG whose header is fine but whose data stops half way (PIL's load fails)."""
    data = image_bytes(64, 64, seed)
    return data[: len(data) // 2]


def write_tar(path: Path, members: list[tuple[str, bytes]], truncate_last: int = 0) -> Path:
    """A tar of ``members`` (name, data); ``truncate_last`` bytes cut off the end of the file."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    if truncate_last:
        # Drop the end-of-archive blocks and part of the last member's data.
        end = len(raw) - 1024
        while end > 0 and raw[end - 1] == 0:
            end -= 1
        raw = raw[: end - truncate_last]
    path.write_bytes(raw)
    return path


def pair_members(key: str, caption: str, seed: int, ext: str = "jpg") -> list[tuple[str, bytes]]:
    fmt = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
    return [(f"{key}.{ext}", image_bytes(24, 20, seed, fmt)), (f"{key}.txt", caption.encode())]


def write_pair_shards(folder: Path, sizes: list[int], prefix: str = "shard") -> list[str]:
    """Shards of good pairs with keys ``s{shard}_{i}``; captions ``"caption {shard} {i}"``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, n in enumerate(sizes):
        members = []
        for i in range(n):
            members += pair_members(f"s{s}_{i:03d}", f"caption {s} {i}", seed=100 * s + i)
        paths.append(str(write_tar(folder / f"{prefix}-{s:06d}.tar", members)))
    return paths


def write_mmc4(root: Path, shards: list[list[dict]], images: dict[str, bytes], zipped: bool = True) -> Path:
    """MMC4 layout: ``root/data/docs_shard_{i}_v2.jsonl[.zip]`` and ``root/images/<name>``.
    A document given as a str is written as that raw line (for malformed lines)."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for name, data in images.items():
        (root / "images" / name).write_bytes(data)
    for i, docs in enumerate(shards):
        name = f"docs_shard_{i}_v2.jsonl"
        text = "".join((d if isinstance(d, str) else json.dumps(d)) + "\n" for d in docs)
        if zipped:
            with zipfile.ZipFile(root / "data" / f"{name}.zip", "w") as zf:
                zf.writestr(name, text)
        else:
            (root / "data" / name).write_text(text)
    return root


def doc(sentences: list[str], images: list[tuple[str, int, float]]) -> dict:
    """An MMC4 document: ``images`` as (image_name, matched_text_index, matched_sim)."""
    return {
        "text_list": sentences,
        "image_info": [
            {"image_name": n, "matched_text_index": ix, "matched_sim": sim} for n, ix, sim in images
        ],
    }
