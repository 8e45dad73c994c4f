"""create_model: shipped configs, checkpoint formats, clear errors; bad inputs raise ValueError."""

from __future__ import annotations

import pytest
import torch

import lcl_fast

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    "pool_project_cfg": {"pool_proj_type": "attn", "input_dim": 64, "output_dim": 32, "attn_num_heads": 2},
    "special_token_ids": {"<start_of_text>": 59, "<end_of_text>": 60, "<img_placehold>": 61,
                          "<start_of_img>": 62, "<end_of_img>": 63},
}


def tiny_batch():
    # grid 2x2 = 4 image tokens; one text-first row, one image-first row.
    row1 = [59, 5, 6, 7, 62, 61, 61, 61, 61, 63] + [0] * 14
    row2 = [62, 61, 61, 61, 61, 63, 8, 9, 60] + [0] * 15
    text = torch.tensor([row1, row2])
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return images, text


def test_shipped_configs_and_keys(golden_dir):
    assert set(lcl_fast.list_models()) >= {"LCL_ViT-B-16_laion", "LCL_ViT-B-32_laion", "LCL_ViT-B-32_mmc4"}
    cfg = lcl_fast.get_model_config("LCL_ViT-B-32_mmc4")
    assert cfg["text_cfg"]["context_length"] == 2048 and cfg["vision_cfg"]["patch_size"] == 32
    # The key names of a full-size model are exactly those of the reference (the golden files list them).
    golden_keys = set(torch.load(golden_dir / "paired_a.pt")["state_dict"])
    cfg["vision_cfg"]["layers"] = cfg["text_cfg"]["layers"] = 2
    with torch.device("meta"):
        model = lcl_fast.create_model(cfg)
    assert set(model.state_dict()) == golden_keys


def test_checkpoint_formats(tmp_path):
    model = lcl_fast.create_model(TINY)
    sd = model.state_dict()
    images, text = tiny_batch()
    expected = model(images, text)["logits"]
    for name, payload in {
        "openclip.pt": {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in sd.items()}},
        "plain.pt": {"state_dict": sd},
        "bare.pt": sd,
    }.items():
        torch.save(payload, tmp_path / name)
        loaded = lcl_fast.create_model(TINY, pretrained=tmp_path / name)
        torch.testing.assert_close(loaded(images, text)["logits"], expected, rtol=0, atol=0)


def test_checkpoint_errors_name_keys(tmp_path):
    sd = lcl_fast.create_model(TINY).state_dict()
    broken = dict(sd)
    broken.pop("lm_head.1.weight")
    broken["text.extra_thing"] = torch.zeros(1)
    torch.save({"state_dict": broken}, tmp_path / "broken.pt")
    expected = r"missing keys \['lm_head.1.weight'\].*unexpected keys \['text.extra_thing'\]"
    with pytest.raises(ValueError, match=expected):
        lcl_fast.create_model(TINY, pretrained=tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="unknown model"):
        lcl_fast.create_model("LCL_ViT-Z-99")
    with pytest.raises(ValueError, match="unknown field"):
        lcl_fast.create_model({**TINY, "text_cfg": {**TINY["text_cfg"], "widht": 3}})


def test_bad_inputs_raise():
    model = lcl_fast.create_model(TINY)
    images, text = tiny_batch()
    with pytest.raises(ValueError, match=r"12 <img_placehold> tokens but 2 images × 4 image tokens = 8"):
        bad = text.clone()
        bad[0, 10:14] = 61
        model(images, bad)
    with pytest.raises(ValueError, match=r"images must be \[n_images, 3, 16, 16\].*\[2, 3, 32, 32\]"):
        model(torch.zeros(2, 3, 32, 32), text)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 64\), got min 0 max 64"):
        bad = text.clone()
        bad[1, 20] = 64
        model(images, bad)
    with pytest.raises(ValueError, match=r"text has 3 <start_of_img> tokens but 2 images were given"):
        bad = text.clone()
        bad[1, 12] = 62
        model(images, bad)
    with pytest.raises(ValueError, match=r"text length 30 exceeds context_length 24"):
        model(images, torch.nn.functional.pad(text, (0, 6)))
    loss = lcl_fast.LCLLoss(1.0, 0.1)
    out = model(images, text)
    with pytest.raises(ValueError, match=r"image_features \[1, 32\] and text_features \[2, 32\]"):
        loss(out["image_features"], torch.cat([out["text_features"]] * 2), out["logits"], out["labels"], 1.0)
    with pytest.raises(ValueError, match="logits .* do not match labels"):
        loss(out["image_features"], out["text_features"], out["logits"][:-1], out["labels"], 1.0)


def test_padding_and_generation_rule():
    """The contrastive pair comes from the text-first row only; labels skip placeholders, <eoi> and pad."""
    model = lcl_fast.create_model(TINY)
    images, text = tiny_batch()
    out = model(images, text)
    assert out["image_features"].shape == (1, 32)
    assert out["labels"].tolist() == [5, 6, 7, 62] + [8, 9, 60]
