"""Model configurations and synthetic interleaved batches for the model and training-step benchmarks.

Configurations: ``LCL_tiny`` (the shipped smoke-test configuration; overhead-bound; the inline
``TINY_CONFIG`` stands in if it is not registered), and the published ``B/32 LAION`` and
``B/32 MMC4`` shapes, at reduced depth on the CPU (``layers`` of both towers overridden) and full
depth on CUDA. Batches follow the reference's sequence layouts (see ``tests/golden/README.md``):
LAION rows are one image and a caption, image first or last; MMC4 rows are documents of sentences
with up to six images, filling the context.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks import _harness as h

TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "head_width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 128, "vocab_size": 1024, "width": 128, "heads": 2, "layers": 2},
    "pool_project_cfg": {"pool_proj_type": "attn", "input_dim": 128, "output_dim": 128, "attn_num_heads": 2},
    "special_token_ids": {
        "<start_of_text>": 1019, "<end_of_text>": 1020, "<img_placehold>": 1021,
        "<start_of_img>": 1022, "<end_of_img>": 1023,
    },
}


@dataclass(frozen=True)
class ModelCase:
    name: str  # a registered configuration name
    layout: str  # "paired" | "interleaved"
    batch: int
    layers: int | None  # depth of both towers (None: as published)
    context_length: int | None = None  # override (smoke only)

    @property
    def label(self) -> str:
        depth = "full depth" if self.layers is None else f"{self.layers} layers"
        return f"{self.name} ({depth}) batch={self.batch}"


CASES: list[ModelCase] = h.by_scale(
    smoke=[
        ModelCase("LCL_tiny", "paired", 4, None),
        ModelCase("LCL_ViT-B-32_laion", "paired", 2, 1),
        ModelCase("LCL_ViT-B-32_mmc4", "interleaved", 1, 1, context_length=256),
    ],
    small=[
        ModelCase("LCL_tiny", "paired", 16, None),
        ModelCase("LCL_ViT-B-32_laion", "paired", 4, 2),
        ModelCase("LCL_ViT-B-32_mmc4", "interleaved", 1, 2),
    ],
    full=[
        ModelCase("LCL_tiny", "paired", 64, None),
        ModelCase("LCL_ViT-B-32_laion", "paired", 128, None),
        ModelCase("LCL_ViT-B-32_mmc4", "interleaved", 8, None),
    ],
)


def model_config(case: ModelCase) -> dict[str, Any]:
    factory = h.import_or_skip("lcl_fast.factory")
    if case.name == "LCL_tiny" and case.name not in factory.list_models():
        return copy.deepcopy(TINY_CONFIG)
    cfg = factory.get_model_config(case.name)
    if case.layers is not None:
        cfg["vision_cfg"]["layers"] = case.layers
        cfg["text_cfg"]["layers"] = case.layers
    if case.context_length is not None:
        cfg["text_cfg"]["context_length"] = case.context_length
    return cfg


def _words(n: int, vocab_words: int, gen: torch.Generator) -> list[int]:
    # ids 1 .. vocab_words-1: never 0 (the padding id) nor a special token
    return torch.randint(1, vocab_words, (n,), generator=gen).tolist()


def make_batch(cfg: dict[str, Any], layout: str, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(images ``[n_images, 3, S, S]``, text ids ``[batch, C]``) on the benchmark device."""
    gen = torch.Generator().manual_seed(seed)
    ids = cfg["special_token_ids"]
    sot, eot = ids["<start_of_text>"], ids["<end_of_text>"]
    img, soi, eoi = ids["<img_placehold>"], ids["<start_of_img>"], ids["<end_of_img>"]
    vocab_words = min(ids.values())
    vcfg, context = cfg["vision_cfg"], cfg["text_cfg"]["context_length"]
    n_img_tokens = (vcfg["image_size"] // vcfg["patch_size"]) ** 2
    image_run = [soi] + [img] * n_img_tokens + [eoi]
    rows, n_images = [], 0
    for r in range(batch):
        if layout == "paired":
            budget = context - n_img_tokens - 4
            caption = _words(int(torch.randint(max(1, budget // 4), budget + 1, (1,), generator=gen)), vocab_words, gen)
            row = image_run + caption + [eot] if r % 2 == 0 else [sot] + caption + image_run
            n_images += 1
        else:
            max_images = max(1, min(6, (context // 2) // len(image_run)))
            k = int(torch.randint(1, max_images + 1, (1,), generator=gen))
            text_budget = context - 2 - k * len(image_run)
            cuts = sorted(torch.randperm(text_budget, generator=gen)[:k].tolist())
            sentences = [b - a for a, b in zip([0] + cuts, cuts + [text_budget])]
            row = [sot]
            for i, length in enumerate(sentences):
                row += _words(length, vocab_words, gen)
                if i < k:
                    row += image_run
            row.append(eot)
            n_images += k
        rows.append(row + [0] * (context - len(row)))
    text = torch.tensor(rows, dtype=torch.long)
    size = vcfg["image_size"]
    images = torch.randn(n_images, 3, size, size, generator=gen)
    return images.to(h.device()), text.to(h.device())


def build(case: ModelCase, impl: str) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor, torch.Tensor]:
    """(model, loss, images, text) for ``impl``; ``reference`` also keeps the reference's full logits."""
    h.require_impl(impl)
    create_model = h.import_or_skip("lcl_fast", "create_model")
    lcl_loss = h.import_or_skip("lcl_fast", "LCLLoss")
    cfg = model_config(case)
    torch.manual_seed(0)
    model = create_model(cfg, impl=impl, fused_generation_loss=impl != "reference").to(h.device())
    loss = lcl_loss(generation_loss_weight=1.0, contrastive_loss_weight=0.1, impl=impl)
    images, text = make_batch(cfg, case.layout, case.batch)
    return model, loss, images, text


def autocast():
    """bfloat16 autocast on CUDA (the published mixed-precision recipe), nothing on the CPU."""
    if h.on_cuda():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def work(case: ModelCase, text: torch.Tensor) -> dict[str, float]:
    return {"samples": case.batch, "tokens": float(text.numel())}
