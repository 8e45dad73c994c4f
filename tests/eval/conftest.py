"""Small evaluation fixtures written in the real formats: ImageNet-style folders, a Karpathy split,
COCO captions, webdataset shards."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch
from PIL import Image

COLORS = {"blue": (30, 40, 230), "green": (20, 200, 40), "red": (220, 20, 20)}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny work on a shared machine: one thread is fastest
    yield
    torch.set_num_threads(threads)


def picture(rgb, k: int, size=(40, 36)) -> Image.Image:
    """A flat colour with a lighter square whose place depends on ``k``: distinct files per class."""
    img = Image.new("RGB", size, tuple(min(255, c + 5 * k) for c in rgb))
    x = 4 + 6 * (k % 4)
    img.paste(tuple(min(255, c + 60) for c in rgb), (x, 8, x + 8, 16))
    return img


def write_class_folder(root, per_class: int, colors=COLORS, offset: int = 0) -> None:
    for cls, rgb in colors.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            picture(rgb, k + offset).save(root / cls / f"{k}.png")


@pytest.fixture
def probe_folders(tmp_path):
    write_class_folder(tmp_path / "train", 4)
    write_class_folder(tmp_path / "val", 2, offset=7)
    return tmp_path / "train", tmp_path / "val"


CAPTIONS = {
    "red": ["a red picture", "something red"],
    "green": ["a green picture", "something green"],
    "blue": ["a blue picture", "something blue"],
}


@pytest.fixture
def karpathy(tmp_path):
    """``dataset_coco.json``-style file: the three colours in split test (val2014/ sub-folder), one in train."""
    images = tmp_path / "coco"
    (images / "val2014").mkdir(parents=True)
    entries = []
    for k, (cls, rgb) in enumerate(COLORS.items()):
        name = f"COCO_val2014_{k:012d}.jpg"
        picture(rgb, k).save(images / "val2014" / name)
        entries.append({"filepath": "val2014", "filename": name, "split": "test", "imgid": k,
                        "sentences": [{"raw": c, "tokens": c.split()} for c in CAPTIONS[cls]]})  # fmt: skip
    entries.append({"filepath": "val2014", "filename": "absent.jpg", "split": "train", "sentences": [{"raw": "x"}]})
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return path, images


@pytest.fixture
def coco_captions(tmp_path):
    """COCO captions format: ``images`` with ids and file names, ``annotations`` with captions."""
    images = tmp_path / "val2017"
    images.mkdir()
    doc = {"images": [], "annotations": []}
    for k, (cls, rgb) in enumerate(COLORS.items()):
        picture(rgb, k).save(images / f"{k:012d}.jpg")
        doc["images"].append({"id": 100 + k, "file_name": f"{k:012d}.jpg", "height": 36, "width": 40})
        for j, c in enumerate(CAPTIONS[cls]):
            doc["annotations"].append({"id": 10 * k + j, "image_id": 100 + k, "caption": c})
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps(doc))
    return path, images


def write_wds(path, pairs) -> None:
    """A webdataset shard: ``{key}.jpg`` + ``{key}.txt`` per pair."""
    with tarfile.open(path, "w") as tar:
        for k, (img, caption) in enumerate(pairs):
            buf = io.BytesIO()
            img.save(buf, format="JPEG")
            for ext, data in (("jpg", buf.getvalue()), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{k:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
