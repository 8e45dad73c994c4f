"""Shared set-up of the export tests: small models of the published configs, optional libraries, corpus images.

The published vision towers and poolers are kept at their widths, patch and image sizes; the vision
depth is cut to 2 blocks so that the suite stays fast, and the text tower, which the hf and timm
exports do not touch, to 1 block and a 64-token vocabulary. Every
parameter is perturbed away from its initialisation (zero biases, unit gains) so that a swapped or
dropped tensor changes the output.
"""

from __future__ import annotations

import importlib
import random

import pytest
import torch

import lcl_fast

EXTRA = "pip install 'lcl-fast[export]'"
PUBLISHED = ("LCL_ViT-B-16_laion", "LCL_ViT-B-32_laion", "LCL_ViT-B-32_mmc4")
# LCL_tiny: a non-224 resolution (32 px, patch 8); "+quick_gelu": the other activation.
VARIANTS = (*PUBLISHED, "LCL_tiny", "LCL_tiny+quick_gelu")


def variant_config(variant: str) -> dict:
    name, _, flag = variant.partition("+")
    cfg = lcl_fast.get_model_config(name)
    cfg["vision_cfg"]["layers"] = min(cfg["vision_cfg"]["layers"], 2)
    cfg["text_cfg"].update(layers=1, vocab_size=64, context_length=min(cfg["text_cfg"]["context_length"], 64))
    cfg["special_token_ids"] = dict(zip(cfg["special_token_ids"], range(59, 64)))
    if flag == "quick_gelu":
        cfg["quick_gelu"] = True
    return cfg


def perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("visual.", "pool_project.")):
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def require(module: str):
    """Import ``module`` or skip naming the extra (also when it is installed but cannot be imported)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        pytest.skip(f"{module} is not usable ({err}): {EXTRA}")
    except Exception as err:  # e.g. timm with a torchvision built for another torch
        pytest.skip(f"{module} is installed but fails to import ({type(err).__name__}: {err}); {EXTRA}")


@pytest.fixture(scope="session")
def small_models():
    """``get(variant) -> (model, config)``, each built once per session, eval mode, fp32."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            torch.manual_seed(VARIANTS.index(variant))
            cfg = variant_config(variant)
            model = lcl_fast.create_model(cfg).eval()
            perturb(model, seed=100 + VARIANTS.index(variant))
            cache[variant] = (model, cfg)
        return cache[variant]

    return get


def corpus_jpegs(n: int) -> list[tuple[str, bytes]]:
    """The built-in corpus's first ``n`` training pairs (caption, JPEG bytes), without building the corpus.

    ``build_corpus`` draws the training pairs first, from ``random.Random(SEED)``: a scene, then its
    picture, in turn. Repeating those draws gives the same bytes as ``pairs/pairs-000000.tar`` (checked
    against a built corpus when this was written), in milliseconds instead of seconds.
    """
    from lcl_fast.data import synthetic as S

    rng, scenes, out = random.Random(S.SEED), S.all_scenes(), []
    for _ in range(n):
        scene = rng.choice(scenes)
        out.append((scene.caption, S._jpeg(S.render(scene, rng))))
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error in the max norm."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())
