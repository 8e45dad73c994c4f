"""The evaluation subcommands on small fixtures in the real formats, checked against direct computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lcl_fast
from lcl_fast.data import decode_batch, get_tokenizer
from lcl_fast.eval import main
from lcl_fast.eval.caption import normalize_caption, score_captions
from lcl_fast.eval.probe import train_probe
from lcl_fast.eval.retrieval import multi_caption_metrics

from .conftest import CAPTIONS, COLORS, picture, write_wds

pytest.importorskip("pycocoevalcap", reason="captioning scores need the 'eval' extra (pycocoevalcap)")

FAST = ["--device", "cpu", "--workers", "0", "--no-progress", "--batch-size", "4"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)  # what the command line builds without --pretrained
    return lcl_fast.create_model("LCL_tiny").eval()


def _decode(files):
    return decode_batch([f.read_bytes() for f in files], 32, train=False, backend="pil")


# ---------------------------------------------------------------------- probe
def test_probe_learns_separable_features_and_not_shuffled_ones():
    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(4, 1, 8, generator=g)
    labels = torch.arange(4).repeat(30)
    tokens = centers[labels] + torch.randn(120, 5, 8, generator=g)
    train = {"tokens": tokens[:80], "pooled": tokens[:80].mean(1), "labels": labels[:80]}
    val = {"tokens": tokens[80:], "pooled": tokens[80:].mean(1), "labels": labels[80:]}
    for probe in ("attentive", "linear"):
        out = train_probe(train, val, 4, probe=probe, epochs=20, lr=1e-2, batch_size=16)
        assert out["top1"] >= 0.95 and out["top5"] == 1.0 and out["chance"] == 0.25, (probe, out)
    shuffled = dict(train, labels=labels[:80][torch.randperm(80, generator=g)])
    assert train_probe(shuffled, val, 4, probe="linear", epochs=20, lr=1e-2, batch_size=16)["top1"] < 0.6


def test_probe_command_caches_features_and_writes_json(probe_folders, tmp_path, capsys):
    train, val = probe_folders
    cache = tmp_path / "cache"
    out_file = tmp_path / "probe.json"
    args = ["probe", "--train-folder", str(train), "--val-folder", str(val), "--epochs", "30", "--lr", "3e-3",
            "--cache-dir", str(cache), "--output", str(out_file), *FAST]  # fmt: skip
    first = main(args)
    assert first["features_cached"] is False and len(list(cache.iterdir())) == 2  # train and val features
    assert {"top1", "top5", "chance", "num_classes", "probe", "epochs"} <= set(first)
    assert first["num_classes"] == 3 and first["chance"] == pytest.approx(1 / 3) and first["probe"] == "attentive"
    assert first["num_train"] == 12 and first["num_val"] == 6 and first["top5"] == 1.0
    # Flat colours: the frozen (random) encoder's patch tokens separate them.
    assert first["top1"] >= 2 / 3, first
    second = main(args)
    assert second["features_cached"] is True and second["top1"] == first["top1"]
    assert json.loads(out_file.read_text())["top1"] == second["top1"]
    assert "attentive probe" in capsys.readouterr().out
    # A changed image changes the key: features are recomputed.
    picture((1, 2, 3), 99).save(val / "red" / "0.png")
    assert main(args)["features_cached"] is False
    linear = main([*args[: -len(FAST)], "--probe", "linear", "--no-cache", *FAST])
    assert linear["probe"] == "linear" and linear["features_cached"] is False


def test_probe_features_are_the_frozen_encoders(model, probe_folders, tmp_path):
    from lcl_fast.eval.common import image_folder
    from lcl_fast.eval.probe import extract_features

    files, labels, _ = image_folder(probe_folders[1])
    got = extract_features(model, files, labels, workers=2, batch_size=4, progress=None)
    tokens = model.visual(_decode(files))
    np.testing.assert_allclose(got["tokens"], tokens.half().float().detach().numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(got["pooled"], model.encode_image(_decode(files), normalize=False).detach().numpy(),
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    assert list(got["labels"]) == labels and got["skipped"] == 0


# ---------------------------------------------------------------------- retrieval
def test_multi_caption_metrics_match_a_loop():
    g = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    owner = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 5])
    txt = F.normalize(img[owner] + 0.9 * torch.randn(10, 8, generator=g), dim=-1)
    out = multi_caption_metrics(img, txt, owner)
    sims = (img @ txt.T).numpy()
    for k in (1, 5, 10):
        i2t = np.mean(
            [any(j in np.argsort(-sims[i])[:k] for j in np.flatnonzero(owner.numpy() == i)) for i in range(6)]
        )
        t2i = np.mean([int(owner[j]) in np.argsort(-sims[:, j])[:k] for j in range(10)])
        assert out[f"image_to_text_R@{k}"] == pytest.approx(i2t) and out[f"text_to_image_R@{k}"] == pytest.approx(t2i)
    assert out["chance"] == pytest.approx(1 / 6) and out["num_captions"] == 10


def test_retrieval_command_on_a_karpathy_split(model, karpathy, tmp_path):
    path, images = karpathy
    out = main(["retrieval", "--karpathy-json", str(path), "--images", str(images), "--split", "test",
                "--output", str(tmp_path / "r.json"), *FAST])  # fmt: skip
    files = sorted((images / "val2014").glob("*.jpg"))
    texts = [c for cls in COLORS for c in CAPTIONS[cls]]
    expected = multi_caption_metrics(
        lcl_fast.eval.encode_images(model, _decode(files)),
        lcl_fast.eval.encode_texts(model, get_tokenizer(context_length=64), texts),
        torch.tensor([0, 0, 1, 1, 2, 2]),
    )
    for key in ("image_to_text_R@1", "image_to_text_R@5", "image_to_text_R@10", "text_to_image_R@1",
                "text_to_image_R@5", "text_to_image_R@10", "chance"):  # fmt: skip
        assert out[key] == pytest.approx(expected[key]), key
    assert out["num_images"] == 3 and out["num_captions"] == 6 and out["skipped"] == 0
    assert json.loads((tmp_path / "r.json").read_text())["chance"] == pytest.approx(1 / 3)


def test_retrieval_command_on_webdataset_shards(tmp_path):
    pairs = [(picture(rgb, k), CAPTIONS[cls][0]) for k, (cls, rgb) in enumerate(COLORS.items())]
    write_wds(tmp_path / "eval-000000.tar", pairs[:2])
    write_wds(tmp_path / "eval-000001.tar", pairs[2:])
    out = main(["retrieval", "--wds-shards", str(tmp_path / "eval-{000000..000001}.tar"), *FAST])
    assert out["num_images"] == 3 and out["num_captions"] == 3 and 0 <= out["text_to_image_R@1"] <= 1
    assert out["image_to_text_R@5"] == 1.0  # three candidates


# ---------------------------------------------------------------------- captioning
def test_caption_normalisation_and_scores():
    assert normalize_caption("A dog's ball, on the GRASS.") == "a dog s ball on the grass"
    refs = {1: ["a red circle on the left"], 2: ["two blue squares at the top"], 3: ["a green triangle"]}
    perfect = score_captions(refs, {k: v[0].upper() + "." for k, v in refs.items()})
    assert perfect["bleu4"] == pytest.approx(1.0, abs=1e-6) and perfect["cider"] > 5
    wrong = score_captions(refs, {1: "three", 2: "orange", 3: "squares"})
    assert wrong["bleu4"] < 1e-6 and wrong["cider"] < 0.5 and wrong["num_images"] == 3


def test_caption_command_on_coco_annotations(model, coco_captions, tmp_path, capsys):
    path, images = coco_captions
    out = main(["caption", "--coco-annotations", str(path), "--images", str(images), "--max-new-tokens", "6",
                "--output", str(tmp_path / "c.json"), *FAST])  # fmt: skip
    results = json.loads((tmp_path / "c_captions.json").read_text())
    assert [r["image_id"] for r in results] == [100, 101, 102] and all(isinstance(r["caption"], str) for r in results)
    tok = get_tokenizer(context_length=64)
    files = sorted(images.glob("*.jpg"))
    expected = lcl_fast.caption(model, tok, _decode(files), max_new_tokens=6)
    assert [r["caption"] for r in results] == expected
    refs = {100 + k: CAPTIONS[cls] for k, cls in enumerate(COLORS)}
    scored = score_captions(refs, {r["image_id"]: r["caption"] for r in results})
    assert out["bleu4"] == pytest.approx(scored["bleu4"]) and out["cider"] == pytest.approx(scored["cider"])
    assert out["num_images"] == 3 and json.loads((tmp_path / "c.json").read_text())["results_file"].endswith(
        "c_captions.json"
    )
    assert "CIDEr" in capsys.readouterr().out
    beam = main(["caption", "--coco-annotations", str(path), "--images", str(images), "--beam-size", "2",
                 "--max-new-tokens", "4", "--results-file", str(tmp_path / "b.json"), *FAST])  # fmt: skip
    assert beam["beam_size"] == 2 and len(json.loads((tmp_path / "b.json").read_text())) == 3


# ---------------------------------------------------------------------- zero-shot
def test_zeroshot_command(probe_folders, tmp_path):
    out = main(["zeroshot", "--imagenet-val", str(probe_folders[1]), "--templates", "simple",
                "--output", str(tmp_path / "z.json"), *FAST])  # fmt: skip
    assert out["zeroshot_classes"] == 3 and out["zeroshot_images"] == 6 and out["zeroshot_skipped"] == 0
    assert json.loads((tmp_path / "z.json").read_text())["command"] == "zeroshot"


# ---------------------------------------------------------------------- bad input
def _fails(args, capsys, *needles):
    with pytest.raises(SystemExit) as info:
        main([*args, *FAST])
    assert info.value.code == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert str(needle) in err, err


def test_bad_input_names_the_file(probe_folders, karpathy, coco_captions, tmp_path, capsys):
    train, val = probe_folders
    _fails(["probe", "--train-folder", str(tmp_path / "nope"), "--val-folder", str(val)], capsys, tmp_path / "nope")
    (train / "empty").mkdir()
    (val / "empty").mkdir()
    _fails(["probe", "--train-folder", str(train), "--val-folder", str(val)], capsys, train / "empty", "no images")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    _fails(["retrieval", "--karpathy-json", str(bad), "--images", str(tmp_path)], capsys, bad, "malformed JSON")
    _fails(["caption", "--coco-annotations", str(bad), "--images", str(tmp_path)], capsys, bad, "malformed JSON")
    _fails(["retrieval", "--karpathy-json", str(karpathy[0]), "--images", str(karpathy[1]), "--split", "val"],
           capsys, karpathy[0], "no images in split 'val'")  # fmt: skip
    _fails(["zeroshot", "--imagenet-val", str(tmp_path / "missing")], capsys, tmp_path / "missing")
    _fails(["caption", "--pretrained", str(tmp_path / "w.pt")], capsys, tmp_path / "w.pt")


def test_undecodable_images_are_skipped_and_counted(probe_folders, coco_captions, tmp_path):
    train, val = probe_folders
    (val / "red" / "broken.png").write_bytes(b"\x89PNG not really")
    for cache in (["--no-cache"], ["--cache-dir", str(tmp_path / "c")], ["--cache-dir", str(tmp_path / "c")]):
        out = main(["probe", "--train-folder", str(train), "--val-folder", str(val), *cache, "--epochs", "1",
                    *FAST])  # fmt: skip
        assert out["skipped"] == 1 and out["num_val"] == 6  # computed, written to the cache, read from it
    assert out["features_cached"]
    zs = main(["zeroshot", "--imagenet-val", str(val), "--templates", "simple", *FAST])
    assert zs["zeroshot_skipped"] == 1 and zs["zeroshot_images"] == 6
    path, images = coco_captions
    (images / "000000000001.jpg").write_bytes(b"garbage")
    cap = main(["caption", "--coco-annotations", str(path), "--images", str(images), "--max-new-tokens", "3",
                "--results-file", str(tmp_path / "r.json"), *FAST])  # fmt: skip
    assert cap["skipped"] == 1 and cap["num_images"] == 2


def test_decode_workers_leave_the_cpu_model_its_cores(monkeypatch):
    from lcl_fast.eval.common import decode_workers

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(6)
        assert decode_workers(4, "cpu") == 2  # 8 cores, 6 for the model's threads
        assert decode_workers(1, "cpu") == 1
        assert decode_workers(4, "cuda") == 4  # a GPU model leaves the cores to the decoders
        assert decode_workers(0, "cuda") == 0
        torch.set_num_threads(8)
        assert decode_workers(2, torch.device("cpu")) == 0
    finally:
        torch.set_num_threads(threads)
