"""Exported towers compute lcl-fast's features exactly (fp32, 1e-5 relative), layer by layer, and the pooler too."""

from __future__ import annotations

import re

import pytest
import torch

from lcl_fast.export import export, load_pooler, pooled_embedding
from lcl_fast.export import pooler as pooler_module
from tests.export.conftest import VARIANTS, rel, require

TOL = 1e-5


def _images(model, n: int = 2) -> torch.Tensor:
    size = model.vision_cfg.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(size))


def _lcl_layers(model, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(ln_pre output then every block's output ``[N, 1 + P, W]``, final token features ``[N, P, W]``)."""
    seen = []
    hooks = [model.visual.ln_pre.register_forward_hook(lambda m, i, o: seen.append(o))]
    hooks += [b.register_forward_hook(lambda m, i, o: seen.append(o)) for b in model.visual.transformer.resblocks]
    try:
        with torch.no_grad():
            tokens = model.visual(x)
    finally:
        for h in hooks:
            h.remove()
    return seen, tokens


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_parity(variant, small_models, tmp_path):
    transformers = require("transformers")
    model, _ = small_models(variant)
    out = export(model, "hf", tmp_path / "hf")
    hf, info = transformers.CLIPVisionModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.config.hidden_act == ("quick_gelu" if variant.endswith("quick_gelu") else "gelu")
    hf.eval()
    x = _images(model)
    layers, tokens = _lcl_layers(model, x)
    with torch.no_grad():
        res = hf(pixel_values=x, output_hidden_states=True)
        post_layernorm = getattr(hf, "vision_model", hf).post_layernorm  # transformers 5 dropped .vision_model
        hf_tokens = post_layernorm(res.last_hidden_state)[:, 1:]
    assert len(res.hidden_states) == len(layers) == model.vision_cfg.layers + 1
    for i, (ours, theirs) in enumerate(zip(layers, res.hidden_states)):
        assert rel(theirs, ours) < TOL, f"hidden state {i}"
    assert rel(hf_tokens, tokens) < TOL
    # LCL's contrastive embedding from the exported tower + pooler.safetensors
    p, heads = load_pooler(out)
    with torch.no_grad():
        assert rel(pooled_embedding(hf_tokens, p, heads), model.encode_image(x, normalize=False)) < TOL


@pytest.mark.parametrize("variant", VARIANTS)
def test_timm_parity(variant, small_models, tmp_path):
    timm = require("timm")
    model, _ = small_models(variant)
    out = export(model, "timm", tmp_path / "timm")
    net = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert net.num_prefix_tokens == 1 and net.patch_embed.proj.bias is None
    x = _images(model)
    layers, tokens = _lcl_layers(model, x)
    with torch.no_grad():
        ours = net.norm_pre(net._pos_embed(net.patch_embed(x)))
        assert rel(ours, layers[0]) < TOL, "after norm_pre"
        for i, block in enumerate(net.blocks):
            ours = block(ours)
            assert rel(ours, layers[i + 1]) < TOL, f"block {i}"
        feats = net.forward_features(x)
    assert rel(feats[:, net.num_prefix_tokens:], tokens) < TOL
    p, heads = load_pooler(out)
    with torch.no_grad():
        assert rel(pooled_embedding(feats[:, 1:], p, heads), model.encode_image(x, normalize=False)) < TOL


def test_timm_layer_scale(tmp_path):
    """A tower with layer scale (``ls_init_value``) exports to timm (``init_values``); transformers refuses it."""
    import lcl_fast
    from tests.export.conftest import perturb, variant_config

    cfg = variant_config("LCL_tiny")
    cfg["vision_cfg"]["ls_init_value"] = 0.5
    model = lcl_fast.create_model(cfg).eval()
    perturb(model, seed=7)
    with pytest.raises(ValueError, match="layer scale"):
        export(model, "hf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.iterdir())
    timm = require("timm")
    net = timm.create_model(f"local-dir:{export(model, 'timm', tmp_path / 'timm')}", pretrained=True).eval()
    x = _images(model)
    with torch.no_grad():
        assert rel(net.forward_features(x)[:, 1:], model.visual(x)) < TOL


def test_pooler_docstring_is_the_function(small_models, tmp_path):
    """The few lines users copy from the pooler docstring compute what :func:`pooled_embedding` does."""
    require("safetensors")
    model, _ = small_models("LCL_tiny")
    out = export(model, "hf", tmp_path / "hf")
    code = re.search(r"::\n\n(.*?)\n\nL2-normalise", pooler_module.__doc__, re.S).group(1)
    code = "\n".join(line[4:] for line in code.splitlines())
    code = code.replace("DIR/pooler.safetensors", str(out / "pooler.safetensors"))
    scope: dict = {}
    exec(code, scope)
    x = _images(model, 3)
    with torch.no_grad():
        tokens = model.visual(x)
        expected = model.encode_image(x, normalize=False)
        assert rel(scope["pooled_embedding"](tokens, scope["p"], scope["num_heads"]), expected) < TOL
        p, heads = load_pooler(out)
        assert rel(pooled_embedding(tokens, p, heads), expected) < TOL
