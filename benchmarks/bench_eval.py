"""Evaluation paths: KV-cached caption decoding, and the probe's frozen-feature extraction.

- **decode**: ``lcl_fast.generation.generate`` on ``LCL_tiny``, greedy, a batch of images, a fixed
  number of new tokens (no early stop: the untrained model practically never writes
  ``<end_of_text>``; the count is recorded). ``reference``: what the reference's model offers,
  its forward on the growing row at every step (vision tower, text tower and LM head over every
  position; the last row's logits pick the token). ``recompute``: ``use_cache=False``, the text
  tower re-run over the whole prefix at every step, image latents computed once, LM head at the
  last position only. ``torch``: the KV cache, one token per step. Throughput: new tokens/s.
- **probe features**: frozen features (patch tokens and pooled) of JPEG files, as the ``probe``
  subcommand extracts them: ``pipeline`` = ``extract_features(workers=2)``: files decoded by 2 loader
  workers while the model runs (with a CPU model, only as many workers as cores its threads leave free);
  ``model_only`` = the model on images already decoded (the ceiling); ``loader_only`` = the
  decoding alone. The pipeline is model-bound when its time is close to ``model_only``'s
  (recorded as ``pipeline_over_model``). Throughput: images per second. CPU sizes: the B/32 LAION
  vision tower at 2 layers (the whole ViT on CUDA) on 224 px crops of 500×375 JPEGs.
"""

from __future__ import annotations

import time

import pytest
import torch

from benchmarks import _harness as h

DECODE_BATCH = h.by_scale(smoke=4, small=16, full=64)
NEW_TOKENS = h.by_scale(smoke=8, small=32, full=32)
PROBE_IMAGES = h.by_scale(smoke=16, small=64, full=512)


def _tiny():
    factory = h.import_or_skip("lcl_fast.factory")
    torch.manual_seed(0)
    return factory.create_model("LCL_tiny", impl="torch").to(h.device()).eval()


def _forward_decode(model, images: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding with the model's forward over the whole row at each step (no cache)."""
    ids = model.special_token_ids
    n = images.shape[0]
    row = [ids["<start_of_img>"], *[ids["<img_placehold>"]] * model.num_img_token, ids["<end_of_img>"]]
    text = torch.tensor([row] * n, device=images.device)
    # A last dummy token: the forward's logits cover positions that have a next token.
    dummy = torch.full((n, 1), ids["<end_of_text>"], device=images.device)
    for _ in range(new_tokens):
        logits = model(images, torch.cat([text, dummy], 1))["logits"].view(n, -1, model.text.vocab_size)
        text = torch.cat([text, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return text[:, len(row) :]


@pytest.mark.parametrize("impl", ["reference", "recompute", "torch"])
def test_caption_decode(benchmark, impl: str) -> None:
    from lcl_fast.generation import generate

    model = _tiny()
    size = model.vision_cfg.image_size
    images = torch.randn(DECODE_BATCH, 3, size, size, generator=h.generator(0)).to(h.device())
    produced = {}

    @torch.no_grad()
    def decode():
        if impl == "reference":
            out = _forward_decode(model, images, NEW_TOKENS)
        else:
            out = generate(model, images, max_new_tokens=NEW_TOKENS, use_cache=impl == "torch")
        produced["shape"] = tuple(out.shape)

    h.measure(
        benchmark,
        decode,
        group=f"caption decode LCL_tiny batch={DECODE_BATCH} new_tokens={NEW_TOKENS}",
        impl=impl,
        work={"tokens": DECODE_BATCH * NEW_TOKENS},
        heavy=False,
        params={"op": "generate", "batch": DECODE_BATCH, "new_tokens": NEW_TOKENS, "kv_cache": impl == "torch"},
    )
    benchmark.extra_info["generated_shape"] = list(produced["shape"])


@pytest.fixture(scope="module")
def jpeg_files(tmp_path_factory):
    from benchmarks.bench_data import synthetic_jpegs

    folder = tmp_path_factory.mktemp("probe_jpegs")
    files = []
    for k, data in enumerate(synthetic_jpegs(PROBE_IMAGES)):
        files.append(folder / f"{k:05d}.jpg")
        files[-1].write_bytes(data)
    return files


def _vit():
    factory = h.import_or_skip("lcl_fast.factory")
    cfg = factory.get_model_config("LCL_ViT-B-32_laion")
    if not h.on_cuda():
        cfg["vision_cfg"]["layers"] = cfg["text_cfg"]["layers"] = 2
    torch.manual_seed(0)
    return factory.create_model(cfg, impl="torch").to(h.device()).eval()


@pytest.mark.parametrize("impl", ["loader_only", "model_only", "pipeline"])
def test_probe_feature_extraction(benchmark, impl: str, jpeg_files) -> None:
    from lcl_fast.eval.common import load_images
    from lcl_fast.eval.probe import extract_features, frozen_features

    model = _vit()
    size, batch = model.vision_cfg.image_size, 32
    decoded = torch.cat([imgs for _, imgs in load_images(jpeg_files, size, batch_size=batch, workers=0)[0]])
    labels = [0] * len(jpeg_files)

    def run():
        if impl == "loader_only":
            for _ in load_images(jpeg_files, size, batch_size=batch, workers=2, device=h.device())[0]:
                pass
        elif impl == "model_only":
            for start in range(0, decoded.shape[0], batch):
                frozen_features(model, decoded[start : start + batch].to(h.device()))
        else:
            extract_features(model, jpeg_files, labels, batch_size=batch, workers=2, progress=None)

    h.measure(
        benchmark,
        run,
        group=f"probe features LCL_ViT-B-32_laion vision ({'full depth' if h.on_cuda() else '2 layers'}) "
        f"{len(jpeg_files)} JPEGs 500x375 -> {size}",
        impl=impl,
        work={"images": len(jpeg_files)},
        heavy=False,
        params={"op": "probe_features", "workers": 0 if impl == "model_only" else 2, "batch": batch},
    )
    if impl == "pipeline":  # the ratio the target is about, measured here side by side
        t0 = time.perf_counter()
        run()
        pipeline = time.perf_counter() - t0
        t0 = time.perf_counter()
        for start in range(0, decoded.shape[0], batch):
            frozen_features(model, decoded[start : start + batch].to(h.device()))
        model_only = time.perf_counter() - t0
        benchmark.extra_info["pipeline_over_model"] = pipeline / model_only
