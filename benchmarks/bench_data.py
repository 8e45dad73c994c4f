"""The image data path: JPEG bytes to a normalised training batch ``[N, 3, S, S]`` on the device.

Contenders:

- ``reference``: what the published code does per image: PIL decode, RGB, random resized crop
  (scale 0.9–1.0, bicubic), to tensor, normalise; the batch stacked and moved to the device.
  torchvision's transforms are used when installed, else an equivalent written here.
- ``pil`` and ``dali``: lcl-fast's ``decode_batch(jpegs, image_size, train=True, backend=...,
  device=...)`` (``dali`` when NVIDIA DALI is installed; on CUDA it decodes on the GPU).

The JPEGs are synthetic photographs-like images (smooth colour fields plus grain, 500×375,
quality 90), made once per session. Throughput: images/s. Peak memory on the CPU is a fresh
process's RSS high-water-mark growth during one (cold) call: decoding buffers are not tensors
(see :mod:`benchmarks._harness`).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import io
import math
import random
from typing import Callable

import pytest
import torch

from benchmarks import _harness as h

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 224
N_IMAGES = h.by_scale(smoke=8, small=64, full=256)
IMPLS = ["reference", "pil", "dali"]
# where lcl-fast's decode_batch may live (first hit wins)
DECODE_MODULES = ("lcl_fast.data.decode", "lcl_fast.data")


@functools.cache
def synthetic_jpegs(count: int, seed: int = 0) -> tuple[bytes, ...]:
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        field = torch.rand(1, 3, 6, 8, generator=gen)
        smooth = torch.nn.functional.interpolate(field, size=(375, 500), mode="bicubic", align_corners=False)
        grain = 0.06 * torch.randn(1, 3, 375, 500, generator=gen)
        pixels = ((smooth + grain).clamp(0, 1) * 255).to(torch.uint8)[0].permute(1, 2, 0).contiguous().numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return tuple(out)


def _crop_box(width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box for scale (0.9, 1.0), ratio (3/4, 4/3): (left, top, w, h)."""
    area = width * height
    log_lo, log_hi = math.log(3 / 4), math.log(4 / 3)
    for _ in range(10):
        target = area * rng.uniform(0.9, 1.0)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w, h_ = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h_ <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h_), w, h_
    ratio = width / height  # fallback: the largest centred crop of an allowed aspect ratio
    if ratio < 3 / 4:
        w, h_ = width, round(width / (3 / 4))
    elif ratio > 4 / 3:
        w, h_ = round(height * (4 / 3)), height
    else:
        w, h_ = width, height
    return (width - w) // 2, (height - h_) // 2, w, h_


def reference_transform(size: int) -> Callable:
    """bytes -> ``[3, S, S]`` float tensor, as the reference's training transform."""
    from PIL import Image

    try:
        from torchvision import transforms as T

        pipeline = T.Compose([
            T.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.Lambda(lambda im: im.convert("RGB")), T.ToTensor(), T.Normalize(MEAN, STD),
        ])
        return lambda data: pipeline(Image.open(io.BytesIO(data)))
    except ImportError:
        pass
    rng = random.Random(0)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)

    def transform(data: bytes) -> torch.Tensor:
        image = Image.open(io.BytesIO(data))
        left, top, w, h_ = _crop_box(*image.size, rng)
        image = image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h_)).convert("RGB")
        array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
        return (array.permute(2, 0, 1).float().div_(255) - mean) / std

    return transform


def _decode_batch() -> Callable:
    errors = []
    for name in DECODE_MODULES:
        try:
            fn = getattr(importlib.import_module(name), "decode_batch", None)
        except Exception as err:  # a module that does not exist yet, or fails at import
            errors.append(f"{name}: {type(err).__name__}")
            continue
        if fn is not None:
            return fn
    pytest.skip(f"lcl-fast's decode_batch not found in {DECODE_MODULES} ({'; '.join(errors) or 'no such name'})")


def _contender(impl: str) -> Callable[[tuple[bytes, ...]], torch.Tensor]:
    dev = h.device()
    if impl == "reference":
        transform = reference_transform(IMAGE_SIZE)
        return lambda jpegs: torch.stack([transform(j) for j in jpegs]).to(dev, non_blocking=True)
    decode_batch = _decode_batch()
    if impl == "dali":
        h.import_or_skip("nvidia.dali", reason=" (pip install nvidia-dali-cuda120)")
    if "device" in inspect.signature(decode_batch).parameters:  # decodes straight onto the device (DALI "mixed")
        return lambda jpegs: decode_batch(list(jpegs), IMAGE_SIZE, train=True, backend=impl, device=dev)
    return lambda jpegs: decode_batch(list(jpegs), IMAGE_SIZE, train=True, backend=impl).to(dev, non_blocking=True)


def prepare(impl: str) -> Callable[[], torch.Tensor]:
    """The timed call for ``impl``, inputs made (also the entry of the memory probe's process)."""
    decode = _contender(impl)
    jpegs = synthetic_jpegs(N_IMAGES)
    return lambda: decode(jpegs)


@pytest.mark.parametrize("impl", IMPLS)
def test_data_path(benchmark, impl: str) -> None:
    jpegs = synthetic_jpegs(N_IMAGES)
    h.measure(
        benchmark,
        prepare(impl),
        group=f"data path decode+augment {N_IMAGES} JPEGs 500x375 -> {IMAGE_SIZE}",
        impl=impl,
        work={"images": len(jpegs)},
        params={"op": "data_path", "n_images": len(jpegs), "image_size": IMAGE_SIZE},
        memory_subprocess=(f"{__name__}:prepare", {"impl": impl}),
    )


# --------------------------------------------------------------------------- the loader (group "data")
# Whole loaders, JPEG shards to batches of normalised images and token rows, same worker count:
# - ``reference``: the reference's strategy: webdataset (shard shuffle, shuffle buffer 1000),
#   PIL decode, torchvision's training transform (emulated above with PIL ops when torchvision is
#   not installed, as here: it has no wheel beside this torch), tokenized, batched, torch DataLoader
#   with persistent workers (open_clip's settings);
# - ``local``: lcl-fast's ``build_train_loader`` over the same local shards;
# - ``s3``: the same over a local S3 server (moto, loopback), streamed with range requests.
LOADER_SHARDS = h.by_scale(smoke=2, small=4, full=8)
LOADER_PER_SHARD = h.by_scale(smoke=16, small=64, full=128)
LOADER_BATCH = 32
LOADER_WORKERS = h.by_scale(smoke=1, small=2, full=4)
LOADER_IMPLS = ["reference", "local", "s3"]


@functools.cache
def _loader_shards() -> tuple[str, tuple[str, ...]]:
    """Local tar shards of (jpg, txt) pairs: their brace pattern and paths."""
    import tarfile
    import tempfile

    folder = tempfile.mkdtemp(prefix="lcl_bench_shards_")
    jpegs = synthetic_jpegs(LOADER_PER_SHARD)
    paths = []
    for s in range(LOADER_SHARDS):
        path = f"{folder}/shard-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i, data in enumerate(jpegs):
                caption = f"a photograph number {i} of shard {s} with smooth colours".encode()
                for ext, payload in (("jpg", data), ("txt", caption)):
                    info = tarfile.TarInfo(f"{s:03d}{i:05d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(path)
    return f"{folder}/shard-{{{0:06d}..{LOADER_SHARDS - 1:06d}}}.tar", tuple(paths)


@functools.cache
def _s3_pattern() -> str:
    """The shards uploaded to a moto S3 server on loopback, in its own process as a real server
    would be (not competing with the loader's main process); the AWS environment points at it."""
    import atexit
    import os
    import socket
    import subprocess
    import sys
    import time

    h.import_or_skip("moto.server", reason=" (pip install 'moto[server]')")
    h.import_or_skip("s3fs", reason=" (pip install 'lcl-fast[s3]')")
    import boto3

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    atexit.register(server.kill)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                pytest.skip("the moto S3 server did not start")
            time.sleep(0.2)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket="bench")
    for path in _loader_shards()[1]:
        client.upload_file(path, "bench", "laion/" + path.rsplit("/", 1)[-1])
    return f"s3://bench/laion/shard-{{{0:06d}..{LOADER_SHARDS - 1:06d}}}.tar"


def _reference_loader(pattern: str, tokenizer) -> Callable[[], int]:
    wds = h.import_or_skip("webdataset", reason=" (pip install webdataset)")
    transform = reference_transform(IMAGE_SIZE)

    def tokens(caption: bytes) -> torch.Tensor:
        ids = [tokenizer.sot_token_id, *tokenizer.encode(caption.decode())[:75], tokenizer.eot_token_id]
        return torch.tensor(ids + [0] * (77 - len(ids)))

    dataset = (
        wds.WebDataset(pattern, shardshuffle=100, seed=0, empty_check=False)
        .shuffle(1000)
        .to_tuple("jpg", "txt")
        .map_tuple(transform, tokens)
        .batched(LOADER_BATCH, partial=False)
    )
    loader = torch.utils.data.DataLoader(  # open_clip's WebLoader settings
        dataset, batch_size=None, num_workers=LOADER_WORKERS, persistent_workers=LOADER_WORKERS > 0
    )

    def epoch() -> int:
        return sum(images.shape[0] for images, _ in loader)

    return epoch


def prepare_loader(impl: str) -> Callable[[], int]:
    """One epoch of ``impl``'s loader; returns the samples it yielded."""
    from lcl_fast.data import build_train_loader, get_tokenizer

    tokenizer = get_tokenizer()
    pattern = _loader_shards()[0]
    if impl == "reference":
        return _reference_loader(pattern, tokenizer)
    data = _s3_pattern() if impl == "s3" else pattern
    total = LOADER_SHARDS * LOADER_PER_SHARD
    loader = build_train_loader(
        "webdataset", data, tokenizer, batch_size=LOADER_BATCH, context_length=128, num_img_token=49,
        image_size=IMAGE_SIZE, workers=LOADER_WORKERS, decoder="pil", num_samples=total, shuffle_buffer=1000,
    )

    def epoch() -> int:
        return sum(batch["images"].shape[0] for batch in loader)

    return epoch


@pytest.mark.parametrize("impl", LOADER_IMPLS)
def test_data_loader(benchmark, impl: str) -> None:
    fn = prepare_loader(impl)
    samples = LOADER_SHARDS * LOADER_PER_SHARD // LOADER_BATCH * LOADER_BATCH
    h.measure(
        benchmark,
        fn,
        group=(f"data loader {LOADER_SHARDS}x{LOADER_PER_SHARD} pairs 500x375 JPEG -> {IMAGE_SIZE}, "
               f"{LOADER_WORKERS} workers"),
        impl=impl,
        work={"samples": samples},
        params={"op": "data_loader", "workers": LOADER_WORKERS, "batch_size": LOADER_BATCH},
    )


# --------------------------------------------------------------------------- interleaved comparison
# On a shared machine the load moves between consecutive pytest-benchmark cases. This runs each
# loader in a fresh process, in turn, several rounds (one warm-up epoch, then two timed ones):
#     python -m benchmarks.bench_data [rounds]
_CHILD = """
import json, sys, time
import benchmarks.bench_data as B
fn = B.prepare_loader(sys.argv[1])
fn()
start = time.perf_counter(); n = fn() + fn()
print(json.dumps({"samples_per_s": n / (time.perf_counter() - start)}))
"""


def interleaved(rounds: int = 3) -> dict[str, list[float]]:
    import json
    import os
    import subprocess
    import sys

    out: dict[str, list[float]] = {impl: [] for impl in LOADER_IMPLS}
    for r in range(rounds):
        for impl in LOADER_IMPLS:
            load = os.getloadavg()[0]
            run = subprocess.run([sys.executable, "-c", _CHILD, impl], capture_output=True, text=True, check=True)
            out[impl].append(json.loads(run.stdout.strip().splitlines()[-1])["samples_per_s"])
            print(f"round {r} {impl:9s} {out[impl][-1]:7.1f} samples/s (load {load:.1f})", flush=True)
    return out


if __name__ == "__main__":
    import statistics
    import sys

    results = interleaved(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"median samples/s: {med}; local/reference {med['local'] / med['reference']:.2f}, "
          f"s3/local {med['s3'] / med['local']:.2f}")
