"""lcl-fast inside open_clip's trainer (the reference is an open_clip fork): what that trainer does with a
model, a loss, a tokenizer and a checkpoint, done here by hand so that no open_clip install is needed.

Each test stands in for one step of ``training/main.py`` / ``training/train.py`` / ``open_clip.factory``.
"""

from __future__ import annotations

import io
import json
import re
import sys
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lcl_fast
from lcl_fast.data.tokenizer import Tokenizer

TINY = "LCL_tiny"


def _tiny(**kwargs) -> lcl_fast.LCL:
    torch.manual_seed(0)
    return lcl_fast.create_model(TINY, impl="torch", **kwargs)


def _batch(model: lcl_fast.LCL, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` paired rows (text first: one contrastive pair each), images of the model's size."""
    gen = torch.Generator().manual_seed(seed)
    n, size, ctx = model.num_img_token, model.vision_cfg.image_size, model.text.context_length
    text = torch.zeros(rows, ctx, dtype=torch.long)
    for r in range(rows):
        words = torch.randint(1, 49000, (3 + r,), generator=gen).tolist()
        seq = [model.sot_id, *words, model.soi_id, *[model.img_id] * n, model.eoi_id]
        text[r, : len(seq)] = torch.tensor(seq)
    return torch.randn(rows, 3, size, size, generator=gen), text


# ---------------------------------------------------------------------------------------------
# 1. open_clip's factory builds the preprocessing from ``model.visual.image_size``

def _open_clip_preprocess_size(model: nn.Module) -> tuple[int, int]:
    """open_clip's create_model: ``force_preprocess_cfg['size'] = model.visual.image_size`` when the
    attribute exists, else the 224 px default."""
    size = getattr(model.visual, "image_size", None)
    return tuple(size) if size is not None else (224, 224)


def test_visual_image_size_drives_open_clip_preprocessing():
    model = _tiny()
    size = _open_clip_preprocess_size(model)
    assert size == (32, 32) != (224, 224)
    assert model.visual.patch_size == (8, 8) and model.visual.grid_size == (4, 4)
    images, text = _batch(model, 2, seed=1)
    resized = F.interpolate(torch.randn(2, 3, 60, 80), size=size, mode="bicubic", align_corners=False)
    out = model(resized, text)  # the size open_clip's transform produces is the size the model accepts
    assert out["image_features"].shape == (2, 64)
    cfg = lcl_fast.get_model_config("LCL_ViT-B-16_laion")
    cfg["vision_cfg"]["layers"] = cfg["text_cfg"]["layers"] = 1
    assert _open_clip_preprocess_size(lcl_fast.create_model(cfg)) == (224, 224)


# ---------------------------------------------------------------------------------------------
# 2. checkpoints written by open_clip's trainer hold numpy scalars in the optimizer state

def _open_clip_checkpoint(model: lcl_fast.LCL) -> dict:
    """What open_clip's trainer saves: epoch, name, a DDP state dict, optimizer and scaler states, the
    scheduler's numpy float64 learning rate in every param group."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    for group in opt.param_groups:
        group["lr"] = np.float64(1e-3) * np.float64(0.5) * (1 + np.cos(np.pi * 0.25))
    sum(p.sum() for p in model.parameters()).backward()
    opt.step()
    return {
        "epoch": 1,
        "name": "lcl_tiny",
        "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(),
        "scaler": {"scale": np.float32(65536.0), "growth_tracker": np.int64(3)},
    }


def _numpy1_spelling(data: bytes) -> bytes:
    """The same checkpoint as numpy 1 writes it: the scalar constructor under ``numpy.core``."""
    src, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            blob = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in blob
                blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            dst.writestr(info.filename, blob)
    return out.getvalue()


class _Payload:  # not a type any checkpoint may hold
    pass


def test_open_clip_trainer_checkpoint_loads_weights_only(tmp_path):
    model = _tiny()
    ckpt = _open_clip_checkpoint(model)
    path = tmp_path / "epoch_1.pt"
    torch.save(ckpt, path)
    loaded = lcl_fast.create_model(TINY, pretrained=path, impl="torch")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    old = tmp_path / "epoch_1_numpy1.pt"
    old.write_bytes(_numpy1_spelling(path.read_bytes()))
    lcl_fast.create_model(TINY, pretrained=old, impl="torch")


def test_checkpoint_with_other_objects_is_still_refused(tmp_path):
    model = _tiny()
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": model.state_dict(), "extra": _Payload()}, path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        lcl_fast.create_model(TINY, pretrained=path)


# ---------------------------------------------------------------------------------------------
# 3. ``encode_text(text, context_length=...)``, as the reference

def test_encode_text_context_length_as_the_reference():
    model = _tiny().eval()
    tok = lcl_fast.get_tokenizer(TINY)
    ids = tok(["a photo of a red square", "a long caption " * 12], 64)  # the second is cut at 64
    before = ids.clone()
    with torch.no_grad():
        default = model.encode_text(ids)
        cut = model.encode_text(ids, context_length=10)
        # by hand, as the reference does it: <eot> → <soi>, cut to 10, <soi> forced into the last slot
        manual = ids.clone()
        manual[manual == tok.eot_token_id] = tok.soi_token_id
        manual = manual[:, :10]
        manual[:, -1][(manual == tok.soi_token_id).sum(1) == 0] = tok.soi_token_id
        want = model.encode_text(manual, context_length=None)
    assert torch.equal(ids, before), "encode_text must not modify its input"
    assert default.shape == cut.shape == (2, 64)
    torch.testing.assert_close(cut, want, rtol=0, atol=0)
    # 8 tokens: the cut leaves the short row's feature where it was (float32 rounding of other shapes aside)
    torch.testing.assert_close(cut[0], default[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(cut[1], default[1])  # the long row's feature moved from slot 63 to slot 9
    with pytest.raises(ValueError, match="context_length"):
        model.encode_text(ids, context_length=0)


# ---------------------------------------------------------------------------------------------
# 4. get_tokenizer looks models up like create_model; ``.encoder`` for the interleaved data wrapper

def test_get_tokenizer_takes_config_paths_dicts_and_registered_models(tmp_path):
    cfg = lcl_fast.get_model_config(TINY)
    cfg["text_cfg"]["context_length"] = 48
    path = tmp_path / "my_lcl.json"
    path.write_text(json.dumps(cfg))
    assert lcl_fast.get_tokenizer(str(path)).context_length == 48
    assert lcl_fast.get_tokenizer(cfg).context_length == 48
    assert lcl_fast.add_model_config(path) == ["my_lcl"]
    assert "my_lcl" in lcl_fast.list_models()
    assert lcl_fast.get_tokenizer("my_lcl").context_length == 48
    assert lcl_fast.create_model("my_lcl").text.context_length == 48
    assert lcl_fast.get_tokenizer(TINY).context_length == 64
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        lcl_fast.get_tokenizer("nope")


def test_tokenizer_encoder_as_the_interleaved_wrapper_reads_it():
    tok = lcl_fast.get_tokenizer()
    # training/interleaved.py: soi/eoi/img ids from tokenizer.encoder
    assert tok.encoder["<start_of_img>"] == 49409
    assert tok.encoder["<end_of_img>"] == 49410
    assert tok.encoder["<img_placehold>"] == 49408
    assert len(tok.encoder) == tok.vocab_size == 49411
    ids = tok.encode("hello world")
    assert [tok.encoder[tok.decoder[i]] for i in ids] == ids and tok.decoder[ids[0]] == "hello</w>"
    with pytest.raises(TypeError):
        tok.encoder["<start_of_img>"] = 0  # read-only: it is every tokenizer's shared vocabulary
    assert isinstance(pickle_roundtrip(tok), Tokenizer)


def pickle_roundtrip(obj):
    import pickle

    return pickle.loads(pickle.dumps(obj))


# ---------------------------------------------------------------------------------------------
# 5. open_clip's cached-feature accumulation (--accum-freq) with the fused generation loss

def _open_clip_accum_step(model, loss_fn, batches) -> dict[str, torch.Tensor]:
    """``training/train.py`` with ``accum_freq = len(batches)``: cache every micro-batch's outputs without
    gradients, then recompute each one and backpropagate its loss over all micro-batches' features."""
    cached: dict[str, list] = {}
    with torch.no_grad():
        for images, text in batches:
            out = model(images, text)
            for f in ("logit_scale", "logit_bias"):
                out.pop(f, None)
            for key, val in out.items():
                cached.setdefault(key, []).append(val)
    model.zero_grad()
    for j, (images, text) in enumerate(batches):
        out = model(images, text)
        extra = {"logit_scale": out.pop("logit_scale")}
        inputs = {key: torch.cat(vals[:j] + [out[key]] + vals[j + 1 :]) for key, vals in cached.items()}
        losses = loss_fn(**inputs, **extra, output_dict=True)
        sum(losses.values()).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_fused_generation_loss_under_open_clip_accumulation():
    plain = _tiny().double()
    fused = _tiny(fused_generation_loss=True).double()
    fused.load_state_dict(plain.state_dict())
    batches = [_batch(plain, 3, seed=11), _batch(plain, 2, seed=12)]
    batches = [(i.double(), t) for i, t in batches]
    loss_fn = lcl_fast.LCLLoss(1.0, 0.1, impl="torch")
    want = _open_clip_accum_step(plain, loss_fn, batches)
    got = _open_clip_accum_step(fused, loss_fn, batches)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-9, atol=1e-12, msg=key)


# ---------------------------------------------------------------------------------------------
# 6. open_clip's low-precision conversion (--precision bf16) finds the weights by module type

@pytest.fixture
def open_clip_classes(monkeypatch):
    """Stand-ins for open_clip's modules as its trainer has them imported (``open_clip.transformer``,
    ``open_clip.model``), with its classes' constructors: lcl-fast may borrow their types, never build them."""
    import types

    class _NeedsArgs(nn.Module):
        def __init__(self, width, layers, heads):  # open_clip's towers take their config
            super().__init__()
            raise AssertionError("open_clip's constructor must not run")

    transformer = types.ModuleType("open_clip.transformer")
    transformer.TextTransformer = type("TextTransformer", (_NeedsArgs,), {})
    transformer.VisionTransformer = type("VisionTransformer", (_NeedsArgs,), {})
    transformer.Attention = type("Attention", (_NeedsArgs,), {})
    model = types.ModuleType("open_clip.model")
    model.CLIP = type("CLIP", (_NeedsArgs,), {})
    package = types.ModuleType("open_clip")
    package.transformer, package.model = transformer, model
    for name, module in (("open_clip", package), ("open_clip.transformer", transformer), ("open_clip.model", model)):
        monkeypatch.setitem(sys.modules, name, module)
    return transformer, model


def _open_clip_convert_weights_to_lp(model: nn.Module, dtype: torch.dtype) -> None:
    """open_clip's ``convert_weights_to_lp`` (``--precision bf16|fp16``), written from its rule: Conv/Linear
    weights and biases; ``in_proj_*``/``q|k|v_proj_weight``/``bias_k``/``bias_v`` of ``nn.MultiheadAttention``
    and its own ``Attention``; ``text_projection`` of its ``CLIP``/``TextTransformer``; ``proj`` of its
    ``VisionTransformer``. The classes come from ``sys.modules`` (the ``open_clip_classes`` fixture)."""
    oc_transformer, oc_model = sys.modules["open_clip.transformer"], sys.modules["open_clip.model"]

    def convert(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            m.weight.data = m.weight.data.to(dtype)
            if m.bias is not None:
                m.bias.data = m.bias.data.to(dtype)
        if isinstance(m, (nn.MultiheadAttention, oc_transformer.Attention)):
            for attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                         "in_proj_bias", "bias_k", "bias_v"):
                t = getattr(m, attr)
                if t is not None:
                    t.data = t.data.to(dtype)
        if isinstance(m, (oc_model.CLIP, oc_transformer.TextTransformer)):
            t = getattr(m, "text_projection", None)
            if t is not None:
                t.data = t.data.to(dtype)
        if isinstance(m, oc_transformer.VisionTransformer):
            t = getattr(m, "proj", None)
            if t is not None:
                t.data = t.data.to(dtype)

    model.apply(convert)


# Parameters the rule converts on the reference model (its module types, REFERENCE.md's keys), the text
# projection included (the reference's text tower is open_clip's TextTransformer).
_REFERENCE_LP = re.compile(
    r"visual\.conv1\.weight|.*\.attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)"
    r"|.*\.mlp\.c_(fc|proj)\.(weight|bias)|pool_project\.pooler\.cross_attn\.(q|k|v|proj)\.weight"
    r"|lm_head\.1\.weight|text\.text_projection"
)


def test_low_precision_conversion_reaches_what_it_reaches_on_the_reference(open_clip_classes):
    model = lcl_fast.create_model(TINY, impl="torch", cast_dtype=torch.bfloat16)
    reference = lcl_fast.create_model(TINY, impl="torch")
    reference.load_state_dict(model.state_dict())
    _open_clip_convert_weights_to_lp(model, torch.bfloat16)
    converted = {k for k, v in model.state_dict().items() if v.dtype == torch.bfloat16}
    want = {k for k in model.state_dict() if _REFERENCE_LP.fullmatch(k)}
    assert converted == want
    assert {k for k in want if ".attn.in_proj" in k} and {k for k in want if "cross_attn.q." in k}
    assert model.text.text_projection.dtype == torch.bfloat16
    # open_clip's "bf16" precision runs without autocast, on bfloat16 inputs
    images, text = _batch(model, 3, seed=5)
    out = model(images.bfloat16(), text)
    want_out = reference(images, text)
    for key in ("image_features", "text_features"):
        assert out[key].dtype == torch.bfloat16
        torch.testing.assert_close(out[key].float(), want_out[key], rtol=0.05, atol=0.03, msg=key)
    loss = sum(lcl_fast.LCLLoss(1.0, 0.1, impl="torch")(**out))
    assert torch.isfinite(loss)


def test_text_tower_borrows_open_clip_type_only_when_open_clip_is_loaded(open_clip_classes):
    from lcl_fast.nn.towers import TextTower

    transformer, _ = open_clip_classes
    inside = _tiny()
    assert isinstance(inside.text, transformer.TextTransformer) and isinstance(inside.text, TextTower)
    assert type(inside.text).lock is TextTower.lock
    assert type(pickle_roundtrip(inside).text) is type(inside.text)  # torch.save(model) finds the class again
    sys.modules.pop("open_clip.transformer")
    outside = _tiny()
    assert type(outside.text) is TextTower
    assert inside.state_dict().keys() == outside.state_dict().keys()
    for k, v in outside.state_dict().items():  # the same initialisation either way
        torch.testing.assert_close(inside.state_dict()[k], v, rtol=0, atol=0, msg=k)


# ---------------------------------------------------------------------------------------------
# 7. --lock-image / --lock-text: open_clip's trainer calls model.lock_image_tower / lock_text_tower


def _frozen(module: nn.Module, prefix: str = "") -> set[str]:
    return {prefix + n for n, p in module.named_parameters() if not p.requires_grad}


def test_lock_image_tower_as_open_clip():
    model = _tiny()  # LCL_tiny's vision tower: 2 blocks -> groups: stem, block 0, (block 1, ln_post)
    vis = {f"visual.{n}" for n, _ in model.visual.named_parameters()}
    model.lock_image_tower()  # the trainer's call: lock_image_tower(unlocked_groups=0, freeze_bn_stats=False)
    assert _frozen(model) == vis  # the pooler, text tower, LM head and logit scale stay trainable

    model = _tiny()
    model.lock_image_tower(unlocked_groups=1, freeze_bn_stats=True)
    trainable = vis - _frozen(model)
    assert trainable == {n for n in vis if n.startswith(("visual.transformer.resblocks.1.", "visual.ln_post."))}
    model.visual.lock(unlocked_groups=3)
    assert not _frozen(model)
    with pytest.raises(ValueError, match=r"unlocked_groups must be an int in \[0, 3\]"):
        model.visual.lock(unlocked_groups=4)


def test_lock_text_tower_as_open_clip():
    model = _tiny()  # 2 text blocks -> groups: embeddings, block 0, (block 1, ln_final), text_projection
    text = {f"text.{n}" for n, _ in model.text.named_parameters()}
    model.lock_text_tower()  # lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    assert _frozen(model) == text and not _frozen(model.lm_head)

    model = _tiny()
    model.lock_text_tower(unlocked_layers=2)
    trainable = text - _frozen(model)
    assert trainable == {"text.text_projection"} | {
        n for n in text if n.startswith(("text.transformer.resblocks.1.", "text.ln_final."))
    }
    model = _tiny()
    model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=False)
    norms = {n for n in text if ".ln_" in n}
    assert norms and text - _frozen(model) == norms
    with pytest.raises(ValueError, match=r"unlocked_layers must be an int in \[0, 4\]"):
        model.lock_text_tower(unlocked_layers=5)
