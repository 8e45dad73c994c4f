"""Image transforms: crop windows, eval geometry, PIL and DALI (CPU) paths."""

import io
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from lcl_fast.data.decode import (
    CLIP_MEAN,
    CLIP_STD,
    BatchDecoder,
    Encoded,
    decode_batch,
    eval_crop_offsets,
    eval_resize_shape,
    eval_roi,
    pil_transform,
    prepare_image,
    random_resized_crop_window,
)

from .fakes import image_bytes, truncated_jpeg


def _png(color, size=(30, 20)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _normalized(color):
    return torch.tensor(
        [(c / 255.0 - m) / s for c, m, s in zip(color, CLIP_MEAN, CLIP_STD)], dtype=torch.float32
    )


@pytest.mark.parametrize("width, height", [(224, 224), (500, 375), (101, 80)])
def test_random_resized_crop_window_bounds(width, height):
    rng = random.Random(width * height)
    for _ in range(300):
        top, left, h, w = random_resized_crop_window(width, height, rng)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        # area in [0.9, 1.0] of the image and aspect in [3/4, 4/3], up to the rounding of w and h
        assert 0.9 * width * height - (w + h) <= w * h <= width * height
        assert 0.75 - 1 / h <= w / h <= 4 / 3 + 1 / h


def test_random_resized_crop_window_is_torchvisions_algorithm():
    # Hand-follow the draws: uniform(scale), uniform(log ratio), then randint top, randint left.
    rng, probe = random.Random(5), random.Random(5)
    area = 300 * 200
    target = area * probe.uniform(0.9, 1.0)
    aspect = math.exp(probe.uniform(math.log(3 / 4), math.log(4 / 3)))
    w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
    if w <= 300 and h <= 200:
        expect = (probe.randint(0, 200 - h), probe.randint(0, 300 - w), h, w)
        assert random_resized_crop_window(300, 200, rng) == expect


def test_random_resized_crop_falls_back_to_center_crop_for_extreme_aspect():
    # 1000 x 10: no window of aspect in [3/4, 4/3] and area >= 90% exists -> widest allowed center crop
    assert random_resized_crop_window(1000, 10, random.Random(0)) == (0, (1000 - 13) // 2, 10, 13)
    assert random_resized_crop_window(10, 1000, random.Random(0)) == ((1000 - 13) // 2, 0, 13, 10)
    assert random_resized_crop_window(37, 101, random.Random(0)) == (26, 0, 49, 37)  # 37 / 0.75 = 49.3
    assert random_resized_crop_window(1, 1, random.Random(0)) == (0, 0, 1, 1)


def test_eval_geometry_matches_torchvision_resize_and_center_crop():
    assert eval_resize_shape(40, 80, 32) == (32, 64)
    assert eval_resize_shape(500, 375, 224) == (298, 224)  # int(224 * 500 / 375) = 298
    assert eval_crop_offsets(298, 224, 224) == (0, 37)
    assert eval_crop_offsets(32, 65, 32) == (16, 0)  # round(16.5) = 16 (banker's rounding, as torchvision)
    y0, x0, y1, x1 = eval_roi(500, 375, 224)
    assert (y0, y1) == (0.0, 375.0)
    assert x0 == pytest.approx(37 * 500 / 298) and x1 == pytest.approx(261 * 500 / 298)


@pytest.mark.parametrize("train", [True, False])
def test_solid_colour_decodes_to_its_normalized_value(train):
    color = (10, 200, 30)
    out = decode_batch([_png(color), _png(color, (7, 50))], image_size=16, train=train, backend="pil")
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    expect = _normalized(color).view(1, 3, 1, 1).expand_as(out)
    torch.testing.assert_close(out, expect, rtol=0, atol=1e-6)


def test_pil_eval_is_resize_then_center_crop():
    data = image_bytes(40, 25, seed=3)
    img = Image.open(io.BytesIO(data)).convert("RGB")
    got = pil_transform(img, 20, train=False, rng=None)
    resized = np.asarray(img.resize((32, 20), Image.BICUBIC))  # int(20 * 40 / 25) = 32
    assert np.array_equal(got, resized[:, 6:26])


def test_pil_train_is_crop_then_bicubic_resize_with_seeded_window():
    data = image_bytes(40, 36, seed=4)
    got = prepare_image(data, 12, True, seed=77, backend="pil")
    img = Image.open(io.BytesIO(data)).convert("RGB")
    top, left, h, w = random_resized_crop_window(40, 36, random.Random(77))
    expect = np.asarray(img.crop((left, top, left + w, top + h)).resize((12, 12), Image.BICUBIC))
    assert (h, w) != (36, 40) and np.array_equal(got, expect)
    assert not np.array_equal(got, prepare_image(data, 12, True, seed=78, backend="pil"))


def test_decode_batch_reports_the_bad_image():
    with pytest.raises(ValueError, match="image 1"):
        decode_batch([_png((1, 2, 3)), b"garbage"], 8, backend="pil")
    with pytest.raises(ValueError, match="image 0"):
        decode_batch([truncated_jpeg()], 8, backend="pil")
    with pytest.raises(ValueError, match="2 seeds for 1 images"):
        decode_batch([_png((1, 2, 3))], 8, backend="pil", seeds=[1, 2])


def test_unknown_backend():
    with pytest.raises(ValueError, match="decoder backend"):
        decode_batch([], 8, backend="opencv")


def test_auto_backend(monkeypatch, caplog):
    from lcl_fast.data import decode

    monkeypatch.setattr(decode, "_said", set())
    monkeypatch.setattr(decode, "dali_available", lambda: True)
    assert decode.resolve_backend("auto", "cuda:1") == "dali"
    assert decode.resolve_backend("auto", "cpu") == "pil"
    monkeypatch.setattr(decode, "dali_available", lambda: False)
    with caplog.at_level("INFO", logger="lcl_fast.data"):
        assert decode.resolve_backend("auto", "cuda") == "pil"
        assert decode.resolve_backend("auto", "cuda") == "pil"
    assert [r.message for r in caplog.records if "not installed" in r.message] == [
        "NVIDIA DALI is not installed: decoding images with PIL (pip install nvidia-dali-cuda120)"
    ]
    with pytest.raises(ImportError, match="nvidia-dali-cuda120"):
        decode.resolve_backend("dali")


# ----------------------------------------------------------------------------- DALI (CPU operators)


@pytest.fixture(scope="module")
def dali():
    return pytest.importorskip("nvidia.dali")


@pytest.mark.parametrize("train", [True, False])
def test_dali_cpu_matches_pil(dali, train):
    images = [image_bytes(61, 47, seed=s) for s in range(3)] + [image_bytes(30, 90, seed=9, fmt="PNG")]
    seeds = [11, 12, 13, 14]
    pil = decode_batch(images, 24, train=train, backend="pil", seeds=seeds)
    got = decode_batch(images, 24, train=train, backend="dali", seeds=seeds)
    assert got.shape == pil.shape == (4, 3, 24, 24)
    # in 1/255 steps of the original pixels: different cubic kernels, same windows
    diff = (got - pil) * torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255
    assert diff.abs().mean() < 1.0, diff.abs().mean()
    assert diff.abs().max() < 12, diff.abs().max()
    other = decode_batch(images, 24, train=train, backend="dali", seeds=[s + 100 for s in seeds])
    assert train == (not torch.equal(other, got))


def test_dali_reports_undecodable_images_and_keeps_the_rest(dali):
    good = [image_bytes(32, 32, seed=s) for s in range(3)]
    items = [prepare_image(b, 16, True, 0, "dali") for b in (good[0], truncated_jpeg(), good[1], good[2])]
    assert all(isinstance(it, Encoded) for it in items)  # the truncated JPEG's header is fine
    out, failed = BatchDecoder(16)(items)
    assert failed == [1] and out.shape == (3, 3, 16, 16)
    alone, _ = BatchDecoder(16)([items[2]])
    torch.testing.assert_close(out[1], alone[0], rtol=0, atol=0)


def test_mixed_prepared_items_keep_their_order(dali):
    gif = io.BytesIO()
    Image.new("RGB", (20, 20), (250, 0, 0)).save(gif, format="GIF")  # not a DALI format: PIL decodes it
    items = [
        prepare_image(_png((0, 0, 250)), 8, False, 0, "dali"),
        prepare_image(gif.getvalue(), 8, False, 0, "dali"),
        prepare_image(_png((0, 250, 0)), 8, False, 0, "dali"),
    ]
    assert [type(it).__name__ for it in items] == ["Encoded", "ndarray", "Encoded"]
    out, failed = BatchDecoder(8)(items)
    assert failed == []
    centers = out[:, :, 4, 4] * torch.tensor(CLIP_STD) + torch.tensor(CLIP_MEAN)
    assert centers.argmax(dim=1).tolist() == [2, 0, 1]
