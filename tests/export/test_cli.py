"""``python -m lcl_fast.export``: round trips on the built-in corpus's images, the open_clip layout, bad input."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lcl_fast
import lcl_fast.export as E
from lcl_fast.data.decode import CLIP_STD, normalize_uint8, pil_decode
from lcl_fast.export.__main__ import main
from tests.export.conftest import corpus_jpegs, rel, require

TOL = 1e-5


@pytest.fixture
def tiny(small_models, tmp_path):
    """(model, config JSON path, trainer-style checkpoint path) for the 32 px LCL_tiny (64-token text vocabulary)."""
    model, cfg = small_models("LCL_tiny")
    cfg_path = tmp_path / "lcl_tiny_small.json"
    cfg_path.write_text(json.dumps(cfg))
    ckpt = tmp_path / "epoch_1.pt"
    state = {f"module.{k}": v for k, v in model.state_dict().items()}  # as the trainer (DDP) saves it
    torch.save({"epoch": 1, "name": "run", "state_dict": state}, ckpt)
    return model, cfg_path, ckpt


def _run(*args: str) -> int:
    return main([str(a) for a in args])


def _corpus_batch(size: int, n: int = 4):
    """(PIL images, lcl-fast's eval pixels ``[n, 3, size, size]``) for the corpus's first ``n`` pictures."""
    jpegs = [j for _, j in corpus_jpegs(n)]
    pil = [Image.open(io.BytesIO(j)).convert("RGB") for j in jpegs]
    ours = normalize_uint8(torch.from_numpy(np.stack([pil_decode(j, size, train=False, seed=0) for j in jpegs])))
    return pil, ours


def test_hf_round_trip_on_corpus_images(tiny, tmp_path):
    transformers = require("transformers")
    model, cfg_path, ckpt = tiny
    out = tmp_path / "hf"
    assert _run("--model", cfg_path, "--pretrained", ckpt, "--format", "hf", "--output", out) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "pooler.safetensors", "preprocessor_config.json"
    ]
    pil, ours = _corpus_batch(model.vision_cfg.image_size)
    # The exported preprocessing is lcl-fast's eval transform (bicubic resize, centre crop, CLIP mean/std):
    # equal with PIL's resampling (transformers < 5 always, >= 5 in CLIPImageProcessorPil); the default
    # processor of transformers >= 5 resamples with torchvision when present: within one 8-bit level.
    pil_processor = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    pixels = pil_processor.from_pretrained(out)(images=pil, return_tensors="pt")["pixel_values"]
    assert pixels.shape == ours.shape and float((pixels - ours).abs().max()) < 1e-5
    default = transformers.CLIPImageProcessor.from_pretrained(out)(images=pil, return_tensors="pt")["pixel_values"]
    assert float((default - ours).abs().max()) <= 1.01 / 255 / min(CLIP_STD)
    hf = transformers.CLIPVisionModel.from_pretrained(out).eval()
    p, heads = E.load_pooler(out)
    with torch.no_grad():
        tokens = getattr(hf, "vision_model", hf).post_layernorm(hf(pixel_values=pixels).last_hidden_state)[:, 1:]
        assert rel(tokens, model.visual(ours)) < TOL
        emb = torch.nn.functional.normalize(E.pooled_embedding(tokens, p, heads), dim=-1)
        assert rel(emb, model.encode_image(ours)) < TOL


def test_timm_round_trip_on_corpus_images(tiny, tmp_path):
    timm = require("timm")
    model, cfg_path, ckpt = tiny
    out = tmp_path / "timm"
    assert _run("--model", cfg_path, "--pretrained", ckpt, "--format", "timm", "--output", out) == 0
    net = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    cfg = net.pretrained_cfg
    size = model.vision_cfg.image_size
    assert tuple(cfg["input_size"]) == (3, size, size) and cfg["interpolation"] == "bicubic"
    assert np.allclose(cfg["mean"], (0.48145466, 0.4578275, 0.40821073))
    _, ours = _corpus_batch(size)
    with torch.no_grad():
        assert rel(net.forward_features(ours)[:, 1:], model.visual(ours)) < TOL


def test_open_clip_is_the_reference_checkpoint_layout(golden_dir, tmp_path):
    """The open_clip export of the reference's own (golden) weights: the reference's keys and values, reloadable."""
    golden = torch.load(golden_dir / "paired_a.pt")
    model = lcl_fast.create_model(golden["config"]).eval()
    model.load_state_dict(golden["state_dict"])
    out = E.export(model, "open_clip", tmp_path / "oc", name="LCL_golden")
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_pytorch_model.bin"]
    sd = torch.load(out / "open_clip_pytorch_model.bin")
    assert set(sd) == set(golden["state_dict"])
    assert all(torch.equal(sd[k], v.float()) for k, v in golden["state_dict"].items())
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["custom_text"] is True and cfg["preprocess_cfg"]["size"] == model.vision_cfg.image_size
    again = lcl_fast.create_model(cfg["model_cfg"], pretrained=out / "open_clip_pytorch_model.bin").eval()
    x = golden["images"].float()
    with torch.no_grad():
        assert torch.equal(again.encode_image(x), model.encode_image(x))


def test_open_clip_cli_round_trip_on_corpus_images(tiny, tmp_path):
    model, cfg_path, ckpt = tiny
    out = tmp_path / "oc"
    assert _run("--model", cfg_path, "--pretrained", ckpt, "--format", "open_clip", "--output", out) == 0
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg["model_name"] == "lcl_tiny_small"
    again = lcl_fast.create_model(cfg["model_cfg"], pretrained=out / "open_clip_pytorch_model.bin").eval()
    _, x = _corpus_batch(model.vision_cfg.image_size)
    with torch.no_grad():
        assert torch.equal(again.encode_image(x), model.encode_image(x))


# ------------------------------------------------------------------------------------------- bad input
def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def test_unknown_format(tiny, tmp_path, capsys):
    model, cfg_path, ckpt = tiny
    with pytest.raises(SystemExit) as exc:
        _run("--model", cfg_path, "--pretrained", ckpt, "--format", "onnx", "--output", tmp_path / "x")
    assert exc.value.code == 2 and "invalid choice: 'onnx'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"unknown export format 'onnx'.*'hf', 'timm', 'open_clip'"):
        E.export(model, "onnx", tmp_path / "x")
    assert not (tmp_path / "x").exists() and not _leftovers(tmp_path)


def test_checkpoint_not_matching_config(tiny, tmp_path, capsys):
    model, cfg_path, ckpt = tiny
    # The shipped LCL_tiny has two text blocks and the 49411-token vocabulary; the small checkpoint has neither.
    with pytest.raises(SystemExit) as exc:
        _run("--model", "LCL_tiny", "--pretrained", ckpt, "--format", "open_clip", "--output", tmp_path / "x")
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"--pretrained {ckpt} does not match --model LCL_tiny" in err
    assert "missing keys" in err
    wide = json.loads(cfg_path.read_text())
    wide["vision_cfg"]["width"] = wide["pool_project_cfg"]["input_dim"] = 128
    (tmp_path / "wide.json").write_text(json.dumps(wide))
    with pytest.raises(SystemExit):
        _run("--model", tmp_path / "wide.json", "--pretrained", ckpt, "--format", "hf", "--output", tmp_path / "x")
    assert "shape mismatch" in capsys.readouterr().err
    partial = tmp_path / "partial.pt"
    sd = model.state_dict()
    del sd["visual.ln_post.weight"]
    torch.save(sd, partial)
    with pytest.raises(SystemExit):
        _run("--model", cfg_path, "--pretrained", partial, "--format", "open_clip", "--output", tmp_path / "x")
    assert "visual.ln_post.weight" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run("--model", cfg_path, "--pretrained", tmp_path / "nope.pt", "--format", "hf", "--output", tmp_path / "x")
    assert "nope.pt: no such file" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not _leftovers(tmp_path)


def test_output_already_holds_a_model(tiny, tmp_path, capsys):
    model, cfg_path, ckpt = tiny
    out = tmp_path / "oc"
    args = ["--model", cfg_path, "--pretrained", ckpt, "--output", out]
    assert _run(*args, "--format", "open_clip") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit) as exc:
        _run(*args, "--format", "open_clip")
    assert exc.value.code == 2 and "already holds a model" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit):
        _run("--model", cfg_path, "--pretrained", ckpt, "--format", "open_clip", "--output", tmp_path / "afile")
    assert "is a file" in capsys.readouterr().err
    # An empty folder is fine; --overwrite replaces a full one.
    (tmp_path / "empty").mkdir()
    assert _run("--model", cfg_path, "--pretrained", ckpt, "--format", "open_clip", "--output", tmp_path / "empty") == 0
    E.export(model, "open_clip", out, name="renamed", overwrite=True)
    assert json.loads((out / "open_clip_config.json").read_text())["model_name"] == "renamed"
    assert not _leftovers(tmp_path)


def test_failed_export_leaves_nothing(tiny, tmp_path, monkeypatch):
    model, _, _ = tiny
    out = tmp_path / "oc"
    E.export(model, "open_clip", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(source, folder):
        (folder / "open_clip_pytorch_model.bin").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setitem(E._WRITERS, "open_clip", broken)
    with pytest.raises(OSError, match="disk full"):
        E.export(model, "open_clip", tmp_path / "new")
    with pytest.raises(OSError, match="disk full"):
        E.export(model, "open_clip", out, overwrite=True)
    assert not (tmp_path / "new").exists() and not _leftovers(tmp_path)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous export is untouched


def test_push_to_hub_wiring(tiny, tmp_path, monkeypatch, capsys):
    """Uploading needs the network: only the calls are checked here, against a stand-in for ``HfApi``."""
    hub = pytest.importorskip("huggingface_hub", reason="huggingface_hub absent: pip install 'lcl-fast[export]'")
    _, cfg_path, ckpt = tiny
    calls = []

    class FakeApi:
        def create_repo(self, repo, private, exist_ok):
            calls.append(("create_repo", repo, private, exist_ok))
            return f"https://example.invalid/{repo}"

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload_folder", sorted(p.name for p in Path(folder_path).iterdir()), repo_id))

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    out = tmp_path / "oc"
    assert _run("--model", cfg_path, "--pretrained", ckpt, "--format", "open_clip", "--output", out,
                "--push-to-hub", "me/lcl", "--private") == 0
    assert calls == [("create_repo", "me/lcl", True, True),
                     ("upload_folder", ["open_clip_config.json", "open_clip_pytorch_model.bin"], "me/lcl")]
    assert "pushed to https://example.invalid/me/lcl" in capsys.readouterr().out
