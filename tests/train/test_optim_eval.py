"""Optimizer parts (decay groups, schedule, clamp) and the evaluation maths (recall@k, zero-shot)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import lcl_fast
from lcl_fast import eval as E
from lcl_fast.data import decode_batch, get_tokenizer
from lcl_fast.training.optim import (
    LOGIT_SCALE_MAX,
    build_optimizer,
    clamp_logit_scale,
    cosine_with_warmup,
    param_groups,
)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return lcl_fast.create_model("LCL_tiny").eval()


def test_decay_on_matrices_only(tiny_model):
    groups = param_groups(tiny_model, 0.2)
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    skip = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    keep = {names[id(p)] for g in groups if g["weight_decay"] == 0.2 for p in g["params"]}
    (decay,) = [g for g in groups if g["weight_decay"] == 0.2]
    assert {
        "logit_scale",
        "visual.class_embedding",
        "text.ln_final.weight",
        "lm_head.0.bias",
        "visual.transformer.resblocks.0.attn.in_proj_bias",
    } <= skip
    assert {
        "visual.conv1.weight",
        "text.token_embedding.weight",
        "lm_head.1.weight",
        "text.text_projection",
        "pool_project.query_token",
        "visual.transformer.resblocks.1.mlp.c_fc.weight",
    } <= keep
    assert all(p.ndim >= 2 for p in decay["params"]) and not skip & keep
    assert len(skip) + len(keep) == len(list(tiny_model.parameters()))


def test_adamw_variants_take_the_same_step(tiny_model):
    """Fused AdamW (the default on plain CPU/CUDA tensors) and the ``--compile-optimizer`` variant
    (foreach, capturable, tensor lr) update the parameters as torch's reference AdamW does."""
    torch.manual_seed(1)
    grads = [torch.randn_like(p) for p in tiny_model.parameters()]
    updated = {}
    for name, kw in {"for_loop": None, "fused": {}, "for_compile": {"for_compile": True}}.items():
        model = lcl_fast.create_model("LCL_tiny")
        model.load_state_dict(tiny_model.state_dict())
        groups = param_groups(model, 0.2)
        if kw is None:
            opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.98), eps=1e-6, foreach=False)
        else:
            opt = build_optimizer(groups, lr=1e-2, betas=(0.9, 0.98), eps=1e-6, **kw)
        if name == "fused":
            assert opt.defaults["fused"] is True
        else:
            assert not opt.defaults.get("fused")
        if name == "for_compile":
            assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) and opt.defaults["capturable"]
        sched = cosine_with_warmup(opt, warmup=2, total_steps=5)
        # capturable state steps only inside torch.compile on the CPU, as the training loop runs it
        step = torch.compile(opt.step, backend="eager") if name == "for_compile" else opt.step
        for _ in range(3):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            step()
            sched.step()
        updated[name] = [p.detach().clone() for p in model.parameters()]
    for name in ("fused", "for_compile"):
        for a, b in zip(updated[name], updated["for_loop"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    moved = max((a - b).abs().max().item() for a, b in zip(updated["fused"], tiny_model.parameters()))
    assert moved > 1e-3  # the steps did move the weights


def test_cosine_schedule_with_warmup():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = cosine_with_warmup(opt, warmup=3, total_steps=11)
    lrs = []
    for _ in range(11):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # open_clip's cosine_lr: base·(s+1)/warmup, then base·½(1 + cos(π·(s−warmup)/(total−warmup))).
    expected = [2.0 * (s + 1) / 3 for s in range(3)] + [
        2.0 * 0.5 * (1 + math.cos(math.pi * (s - 3) / 8)) for s in range(3, 11)
    ]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12, atol=1e-12)


def test_logit_scale_clamp():
    model = lcl_fast.create_model("LCL_tiny")
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    clamp_logit_scale(model)
    assert model.logit_scale.item() == pytest.approx(LOGIT_SCALE_MAX)
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    clamp_logit_scale(model)
    assert model.logit_scale.item() == 0.0


def _recall_oracle(sims: np.ndarray, k: int) -> tuple[float, float]:
    n = sims.shape[0]
    i2t = np.mean([sum(sims[i, j] > sims[i, i] for j in range(n)) < k for i in range(n)])
    t2i = np.mean([sum(sims[j, i] > sims[i, i] for j in range(n)) < k for i in range(n)])
    return float(i2t), float(t2i)


@pytest.mark.parametrize("n", [1, 7, 33])
def test_retrieval_metrics_match_a_loop(n):
    g = torch.Generator().manual_seed(n)
    img = F.normalize(torch.randn(n, 16, generator=g), dim=-1)
    txt = F.normalize(img + 1.3 * torch.randn(n, 16, generator=g), dim=-1)  # noisy pairs: partial recall
    out = E.retrieval_metrics(img, txt)
    sims = (img.double() @ txt.double().T).numpy()
    for k in (1, 5):
        i2t, t2i = _recall_oracle(sims, k)
        assert out[f"image_to_text_R@{k}"] == pytest.approx(i2t)
        assert out[f"text_to_image_R@{k}"] == pytest.approx(t2i)
    assert out["chance"] == pytest.approx(1 / n) and out["num_pairs"] == n
    ranks_i2t = [1 + sum(sims[i, j] > sims[i, i] for j in range(n)) for i in range(n)]
    ranks_t2i = [1 + sum(sims[j, i] > sims[i, i] for j in range(n)) for i in range(n)]
    assert out["image_to_text_mean_rank"] == pytest.approx(np.mean(ranks_i2t))
    assert out["text_to_image_mean_rank"] == pytest.approx(np.mean(ranks_t2i))
    shifted = E.retrieval_metrics(img, img.roll(1, dims=0))  # every image's best text is another pair's
    assert n == 1 or shifted["image_to_text_R@1"] == 0.0
    assert E.retrieval_metrics(img, img)["retrieval_top1"] == 1.0


def test_text_features_are_not_changed_by_trimming_padding(tiny_model):
    tok = get_tokenizer(context_length=64)
    texts = ["a red circle on the left", "three blue squares at the top and more words", "x"]
    trimmed = E.encode_texts(tiny_model, tok, texts, context_length=64)
    full = F.normalize(tiny_model.encode_text(tok(texts, 64)).float(), dim=-1)
    torch.testing.assert_close(trimmed, full, rtol=1e-5, atol=1e-6)
    # The feature sits at <start_of_img>, which replaces <end_of_text> (forced into the last slot when cut).
    long = E.encode_texts(tiny_model, tok, ["word " * 100], context_length=64)
    ids = tok(["word " * 100], 64)
    assert int(ids[0, -1]) == tok.eot_token_id
    torch.testing.assert_close(
        long, F.normalize(tiny_model.encode_text(ids).float(), dim=-1), rtol=1e-5, atol=1e-6
    )


def test_templates():
    assert len(E.OPENAI_IMAGENET_TEMPLATES) == 80 == len(set(E.OPENAI_IMAGENET_TEMPLATES))
    assert all(t.count("{}") == 1 for t in E.OPENAI_IMAGENET_TEMPLATES)
    assert E.load_templates("simple") == list(E.SIMPLE_IMAGENET_TEMPLATES)
    with pytest.raises(ValueError, match="exactly one"):
        E.load_templates(["no slot"])


def _image_folder(root, colors):
    for cls, rgb in colors.items():
        (root / cls).mkdir(parents=True)
        for k in range(3):
            Image.new("RGB", (40 + 7 * k, 36), tuple(min(255, c + 9 * k) for c in rgb)).save(
                root / cls / f"{k}.png"
            )


def test_zero_shot_matches_its_definition(tiny_model, tmp_path):
    colors = {"b_red": (220, 20, 20), "a_green": (20, 200, 40), "c_blue": (30, 40, 230)}
    _image_folder(tmp_path, colors)
    (tmp_path / "classnames.txt").write_text("green thing\nred thing\nblue thing\n")
    tok = get_tokenizer(context_length=64)
    templates = ["a photo of a {}.", "art of the {}."]
    out = E.evaluate_zero_shot(tiny_model, tok, tmp_path, templates=templates, batch_size=4, decoder="pil")
    # Oracle: per class the normalised mean of normalised prompt features; images by the eval transform.
    names = ["green thing", "red thing", "blue thing"]
    cls = torch.stack(
        [
            F.normalize(
                F.normalize(tiny_model.encode_text(tok([t.format(n) for t in templates], 64)), dim=-1).mean(
                    0
                ),
                dim=0,
            )
            for n in names
        ]
    )
    files = sorted(tmp_path.glob("*/*.png"))
    labels = torch.tensor([sorted(colors).index(f.parent.name) for f in files])
    images = decode_batch([f.read_bytes() for f in files], 32, train=False, backend="pil")
    logits = F.normalize(tiny_model.encode_image(images), dim=-1) @ cls.T
    top1 = float((logits.argmax(1) == labels).float().mean())
    top3 = float((logits.topk(3, dim=1).indices == labels[:, None]).any(1).float().mean())
    assert out["zeroshot_top1"] == pytest.approx(top1) and out["zeroshot_top3"] == pytest.approx(top3) == 1.0
    assert out["zeroshot_images"] == 9 and out["zeroshot_classes"] == 3


def test_zero_shot_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no class sub-folders"):
        E.image_folder(tmp_path)
    _image_folder(tmp_path, {"x": (1, 2, 3), "y": (4, 5, 6)})
    (tmp_path / "classnames.txt").write_text("only one\n")
    with pytest.raises(ValueError, match="lists 1 names for 2 class folders"):
        E.image_folder(tmp_path)


def test_eval_command_line(tiny_model, corpus_cache, tmp_path, capsys):
    torch.save({"state_dict": tiny_model.state_dict()}, tmp_path / "w.pt")
    _image_folder(tmp_path / "val", {"red": (220, 20, 20), "blue": (30, 40, 230)})
    out = E.main(
        [
            "--pretrained",
            str(tmp_path / "w.pt"),
            "--val-pairs",
            "20",
            "--imagenet-val",
            str(tmp_path / "val"),
            "--templates",
            "simple",
            "--device",
            "cpu",
        ]
    )
    assert out["num_pairs"] == 20 and 0.0 <= out["retrieval_top1"] <= 1.0
    assert out["zeroshot_images"] == 6 and out["zeroshot_classes"] == 2
    assert json.loads(capsys.readouterr().out)["zeroshot_top1"] == out["zeroshot_top1"]


def test_compiled_optimizer_resumes_exactly(tiny_model):
    """``--compile-optimizer``'s capturable AdamW loads a checkpointed state through
    torch.distributed.checkpoint (which would step it eagerly, refused on the CPU) and continues
    as the uninterrupted run does."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    from lcl_fast.training.optim import prime_optimizer_state

    full = StateDictOptions(full_state_dict=True)
    torch.manual_seed(2)
    grads = [[torch.randn_like(p) for p in tiny_model.parameters()] for _ in range(4)]

    def fresh():
        model = lcl_fast.create_model("LCL_tiny")
        model.load_state_dict(tiny_model.state_dict())
        opt = build_optimizer(param_groups(model, 0.2), lr=1e-2, betas=(0.9, 0.98), eps=1e-6, for_compile=True)
        return model, opt, torch.compile(opt.step, backend="eager")

    def run(model, step, steps):
        for g in steps:
            for p, gp in zip(model.parameters(), g):
                p.grad = gp.clone()
            step()

    model, opt, step = fresh()
    run(model, step, grads)
    expected = [p.detach().clone() for p in model.parameters()]

    model, opt, step = fresh()
    run(model, step, grads[:2])
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = get_optimizer_state_dict(model, opt, options=full)
    model, opt, step = fresh()
    model.load_state_dict(saved_weights)
    prime_optimizer_state(opt, list(model.parameters()), step)
    for name, p in model.named_parameters():  # the zero-rate step moved nothing
        assert torch.equal(p, saved_weights[name]), name
    set_optimizer_state_dict(model, opt, saved_opt, options=full)
    run(model, step, grads[2:])
    for a, b in zip(model.parameters(), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
