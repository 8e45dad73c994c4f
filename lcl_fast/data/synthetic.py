"""The built-in corpus: rendered scenes described in words, in the real on-disk formats.

``ensure_corpus(cache_dir=None)`` builds it once (about a second) under
``$LCL_FAST_CACHE/synthetic`` (default ``~/.cache/lcl_fast/synthetic``) and returns its folder:

- ``pairs/pairs-{000000..000003}.tar``: 2048 image–caption pairs as webdataset shards
  (``{key}.jpg``, ``{key}.txt``, ``{key}.json``);
- ``eval/pairs-000000.tar``: 200 held-out pairs, one per scene, all captions distinct;
- ``mmc4/data/docs_shard_{0,1}_v2.jsonl.zip`` and ``mmc4/images/*.jpg``: 256 interleaved
  documents in MMC4's layout, each describing 1–7 scenes, with images below the similarity
  threshold and duplicate matches, so every selection rule has something to do.

A scene is 1–3 shapes (circle, square, triangle) of one of six colours in one of five places
of a 64 px picture; its caption says so ("two blue squares at the top"). Captions are short and
compositional, so a small model's retrieval accuracy on the held-out pairs rises quickly from
chance (1/200) as it learns. Everything is drawn from a fixed seed: the corpus is the same on
every machine (up to the JPEG encoder's version).
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import shutil
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from PIL import Image, ImageDraw

from .shards import cache_root

VERSION = "v1"
IMAGE_PX = 64
TRAIN_PAIRS, PAIRS_PER_SHARD = 2048, 512
EVAL_PAIRS = 200
DOCS, DOCS_PER_SHARD = 256, 128
SEED = 20240607

COLORS = {
    "red": (215, 35, 35),
    "green": (40, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (230, 200, 30),
    "purple": (135, 50, 165),
    "orange": (240, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
# Where the shapes go (x0, y0, x1, y1 as fractions of the picture; the boxes do not overlap, so
# the picture decides the words) and how the caption says it.
PLACES = {
    "left": ((0.0, 0.28, 0.34, 0.72), "on the left"),
    "right": ((0.66, 0.28, 1.0, 0.72), "on the right"),
    "top": ((0.28, 0.0, 0.72, 0.34), "at the top"),
    "bottom": ((0.28, 0.66, 0.72, 1.0), "at the bottom"),
    "center": ((0.34, 0.34, 0.66, 0.66), "in the center"),
}
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
_INTROS = ("here are some pictures.", "a page about shapes.", "my drawings from today.", "look at these.")
_FILLERS = ("it looks nice.", "what a picture.", "i like this one.", "simple and clean.")


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    place: str
    count: int

    @property
    def caption(self) -> str:
        noun = self.shape if self.count == 1 else self.shape + "s"
        count = "an" if self.count == 1 and self.color[0] in "aeiou" else COUNT_WORDS[self.count]
        return f"{count} {self.color} {noun} {PLACES[self.place][1]}"


def all_scenes() -> list[Scene]:
    """Every scene (6 colours x 3 shapes x 5 places x 3 counts = 270), in a fixed order."""
    return [Scene(c, s, p, n) for c, s, p, n in itertools.product(COLORS, SHAPES, PLACES, COUNT_WORDS)]


def _jitter(color: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, ...]:
    return tuple(min(255, max(0, v + rng.randint(-amount, amount))) for v in color)


def render(scene: Scene, rng: random.Random, size: int = IMAGE_PX) -> Image.Image:
    """A ``size`` px picture of ``scene``: shapes of jittered size and shade, not overlapping."""
    background = tuple(rng.randint(200, 250) for _ in range(3))
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    (x0, y0, x1, y1), _ = PLACES[scene.place]
    boxes: list[tuple[float, float, float]] = []
    side = size * (rng.uniform(0.2, 0.28) if scene.count == 1 else rng.uniform(0.15, 0.2))
    while len(boxes) < scene.count:
        for _ in range(200):
            x = rng.uniform(x0 * size, x1 * size - side)
            y = rng.uniform(y0 * size, y1 * size - side)
            if all(abs(x - bx) > side + 1 or abs(y - by) > side + 1 for bx, by, _ in boxes):
                boxes.append((x, y, side))
                break
        else:  # no room: start over with smaller shapes
            boxes, side = [], side * 0.85
    for x, y, s in boxes:
        fill = _jitter(COLORS[scene.color], rng, 20)
        if scene.shape == "circle":
            draw.ellipse((x, y, x + s, y + s), fill=fill)
        elif scene.shape == "square":
            draw.rectangle((x, y, x + s, y + s), fill=fill)
        else:
            draw.polygon([(x + s / 2, y), (x, y + s), (x + s, y + s)], fill=fill)
    return img


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _write_pairs(path: Path, pairs: list[tuple[str, Scene, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, scene, jpeg in pairs:
            meta = {
                "caption": scene.caption,
                "color": scene.color,
                "shape": scene.shape,
                "place": scene.place,
                "count": scene.count,
            }
            _add_member(tar, f"{key}.jpg", jpeg)
            _add_member(tar, f"{key}.txt", scene.caption.encode())
            _add_member(tar, f"{key}.json", json.dumps(meta).encode())


def _make_doc(d: int, rng: random.Random, scenes: list[Scene], images: Path) -> dict:
    """One MMC4-style document: described scenes, plus off-topic and duplicate images."""
    sentences = [rng.choice(_INTROS)]
    infos = []

    def add_image(k: int, scene: Scene, sentence: int, sim: float) -> None:
        name = f"{d:05d}_{k}.jpg"
        (images / name).write_bytes(_jpeg(render(scene, rng)))
        infos.append(
            {
                "image_name": name,
                "raw_url": f"synthetic://{d}/{k}",
                "matched_text_index": sentence,
                "matched_sim": round(sim, 4),
            }
        )

    k = 0
    for _ in range(rng.randint(1, 7)):
        scene = rng.choice(scenes)
        sentences.append(scene.caption + ".")
        add_image(k, scene, len(sentences) - 1, rng.uniform(0.25, 0.4))
        k += 1
        if rng.random() < 0.15:  # a second picture of the same thing: one of the two is kept
            add_image(k, scene, len(sentences) - 1, rng.uniform(0.25, 0.4))
            k += 1
        if rng.random() < 0.3:
            sentences.append(rng.choice(_FILLERS))
    if rng.random() < 0.3:  # an unrelated picture, below the similarity threshold
        add_image(k, rng.choice(scenes), 0, rng.uniform(0.1, 0.23))
    rng.shuffle(infos)  # MMC4 does not sort image_info by sentence
    return {"url": f"synthetic://{d}", "text_list": sentences, "image_info": infos}


def build_corpus(root: Union[str, os.PathLike]) -> None:
    """Write the corpus into the (new or empty) folder ``root``."""
    root = Path(root)
    rng = random.Random(SEED)
    scenes = all_scenes()
    for sub in ("pairs", "eval", "mmc4/data", "mmc4/images"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    train = [
        (f"{i:06d}", s, _jpeg(render(s, rng)))
        for i, s in enumerate(rng.choice(scenes) for _ in range(TRAIN_PAIRS))
    ]
    for shard, start in enumerate(range(0, TRAIN_PAIRS, PAIRS_PER_SHARD)):
        _write_pairs(root / "pairs" / f"pairs-{shard:06d}.tar", train[start : start + PAIRS_PER_SHARD])
    held_out = rng.sample(scenes, EVAL_PAIRS)
    _write_pairs(
        root / "eval" / "pairs-000000.tar",
        [(f"eval{i:06d}", s, _jpeg(render(s, rng))) for i, s in enumerate(held_out)],
    )

    docs = [_make_doc(d, rng, scenes, root / "mmc4" / "images") for d in range(DOCS)]
    for shard, start in enumerate(range(0, DOCS, DOCS_PER_SHARD)):
        name = f"docs_shard_{shard}_v2.jsonl"
        lines = "".join(json.dumps(doc) + "\n" for doc in docs[start : start + DOCS_PER_SHARD])
        with zipfile.ZipFile(root / "mmc4" / "data" / f"{name}.zip", "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(name, lines)

    manifest = {
        "version": VERSION,
        "image_px": IMAGE_PX,
        "train_pairs": TRAIN_PAIRS,
        "eval_pairs": EVAL_PAIRS,
        "docs": DOCS,
        "images_in_docs": sum(len(doc["image_info"]) for doc in docs),
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))


def ensure_corpus(cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The corpus folder, built if absent (atomically: concurrent ranks may race)."""
    base = Path(cache_dir) if cache_dir is not None else cache_root() / "synthetic"
    final = base / VERSION
    if (final / "manifest.json").is_file():
        return final
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{VERSION}-", dir=base))
    try:
        build_corpus(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "manifest.json").is_file():  # not another builder's result: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
