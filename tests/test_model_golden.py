"""Golden parity: lcl_fast.LCL + LCLLoss against outputs of the reference code itself."""

from __future__ import annotations

import pytest
import torch

import lcl_fast
from tests._compare import rel_err

CASES = ("paired_a", "interleaved_a")
# (dtype, tolerance on features/logits, on gradients, on the generation loss, on the contrastive loss)
# float64: the reference computes the contrastive logits in float32, hence 1e-6 there.
# float32: ~100 ulp on outputs; gradients pass through more rounding steps, hence 2e-4.
PRECISIONS = {
    torch.float64: dict(feat=1e-5, grad=1e-5, gen=1e-9, con=1e-6),
    torch.float32: dict(feat=1e-5, grad=2e-4, gen=1e-6, con=1e-5),
}


@pytest.fixture(scope="module", params=CASES)
def golden(request, golden_dir):
    return torch.load(golden_dir / f"{request.param}.pt")


def grad_errors(grads: dict, golden_grads: dict) -> dict:
    """Max-norm relative error per parameter.

    Two golden gradients are mathematically zero (``k_bias`` and ``norm1_k.bias`` of the pooler shift every
    key by the same amount, which softmax ignores) and hold only rounding noise (~1e-19); their error is
    measured against 1e-3 of the largest gradient of the model instead. Every other golden gradient is
    above 1e-2 of that scale, so the floor never applies to them.
    """
    floor = 1e-3 * max(g.abs().max().item() for g in golden_grads.values())
    out = {}
    for k, g in grads.items():
        ref = golden_grads[k]
        err = (g.detach().double() - ref.double()).abs().max().item()
        out[k] = err / max(ref.abs().max().item(), floor)
    return out


def run_model(golden: dict, dtype: torch.dtype, impl: str, fused: bool = False):
    model = lcl_fast.create_model(golden["config"], impl=impl, fused_generation_loss=fused)
    model.load_state_dict(golden["state_dict"], strict=True)
    model = model.to(dtype)
    loss_fn = lcl_fast.LCLLoss(
        generation_loss_weight=golden["generation_loss_weight"],
        contrastive_loss_weight=golden["contrastive_loss_weight"],
        local_loss=True,  # the published training scripts' flags
        gather_with_grad=True,
        impl=impl,
    )
    out = model(golden["images"].to(dtype), golden["text_ids"])
    contrastive, generation = loss_fn(**out)
    (contrastive + generation).backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    return out, contrastive, generation, grads


# Triton kernels take no float64; on the CPU they run in the interpreter (tests/conftest.py).
IMPL_DTYPES = [
    ("reference", torch.float64), ("reference", torch.float32),
    ("torch", torch.float64), ("torch", torch.float32),
    ("triton", torch.float32),
]


@pytest.mark.parametrize("impl,dtype", IMPL_DTYPES, ids=[f"{i}-{str(d)[-7:]}" for i, d in IMPL_DTYPES])
def test_golden_parity(golden, impl, dtype):
    tol = PRECISIONS[dtype]
    out, contrastive, generation, grads = run_model(golden, dtype, impl)
    assert rel_err(out["image_features"], golden["image_features"]) <= tol["feat"]
    assert rel_err(out["text_features"], golden["text_features"]) <= tol["feat"]
    assert rel_err(out["logits"], golden["gen_logits"]) <= tol["feat"]
    assert torch.equal(out["labels"], golden["gen_labels"])
    # The golden logit_scale was rounded through float32 (half an ulp is 6e-8).
    assert rel_err(out["logit_scale"], golden["logit_scale"]) <= 1e-7
    assert rel_err(contrastive, golden["contrastive_loss"]) <= tol["con"]
    assert rel_err(generation, golden["generation_loss"]) <= tol["gen"]
    assert set(grads) == set(golden["grads"])
    bad = {k: e for k, e in grad_errors(grads, golden["grads"]).items() if not e <= tol["grad"]}
    assert not bad, f"gradients off by more than {tol['grad']:g} (relative, max norm): {bad}"


@pytest.mark.parametrize("impl,dtype", [("torch", torch.float64), ("triton", torch.float32)], ids=["torch", "triton"])
def test_fused_generation_matches_golden(golden, impl, dtype):
    tol = PRECISIONS[dtype]
    out, contrastive, generation, grads = run_model(golden, dtype, impl, fused=True)
    assert "logits" not in out and out["hidden"].shape[0] == golden["gen_labels"].shape[0]
    assert rel_err(generation, golden["generation_loss"]) <= tol["gen"]
    bad = {k: e for k, e in grad_errors(grads, golden["grads"]).items() if not e <= tol["grad"]}
    assert not bad, bad


def test_padding_skip_is_exact(golden):
    """The Triton path marks trailing padding for the kernel to skip; the result must not move."""
    model = lcl_fast.create_model(golden["config"], impl="triton")
    model.load_state_dict(golden["state_dict"])
    text = golden["text_ids"]
    doc_ids = model.padding_doc_ids(text)
    lengths = [int((row != 0).nonzero().max()) + 1 for row in text]
    assert [int((d == 0).sum()) for d in doc_ids] == lengths and bool(((doc_ids == 0) | (doc_ids == -1)).all())
    images = golden["images"].float()
    skipped = model(images, text)
    full = model(images, text, doc_ids=torch.zeros_like(text))  # one document per row: nothing skipped
    for key in ("image_features", "text_features", "logits"):
        assert rel_err(skipped[key], full[key]) <= 1e-5, key


def test_bf16_autocast_runs(golden):
    model = lcl_fast.create_model(golden["config"], impl="torch")
    model.load_state_dict(golden["state_dict"])
    model = model.float()
    loss_fn = lcl_fast.LCLLoss(1.0, 0.1, local_loss=True, gather_with_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(golden["images"].float(), golden["text_ids"])
        contrastive, generation = loss_fn(**out)
    (contrastive + generation).backward()
    assert torch.isfinite(contrastive) and torch.isfinite(generation)
    # bf16 keeps ~3 significant digits: the losses stay close to the float64 truth.
    assert rel_err(generation, golden["generation_loss"]) < 2e-2
    assert rel_err(contrastive, golden["contrastive_loss"]) < 5e-2
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_encode_image_and_text(golden):
    model = lcl_fast.create_model(golden["config"], impl="torch").double()
    model.load_state_dict(golden["state_dict"])
    feats = model.encode_image(golden["images"])
    assert feats.shape == (golden["images"].shape[0], golden["config"]["embed_dim"])
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(feats.shape[0], dtype=feats.dtype))
    # Text features at <start_of_img>: the same function as in forward, so for a row that is a prefix ending
    # in <start_of_img>, encode_text equals the contrastive text feature of that image.
    text = golden["text_ids"]
    soi = golden["config"]["special_token_ids"]["<start_of_img>"]
    row, pos = [(r, int(p)) for r in range(text.shape[0]) for p in (text[r] == soi).nonzero().flatten() if p > 0][0]
    prefix = torch.zeros(1, text.shape[1], dtype=torch.long)
    prefix[0, : pos + 1] = text[row, : pos + 1]
    before = prefix.clone()
    feats = model.encode_text(prefix)
    assert torch.equal(prefix, before), "encode_text must not modify its input"
    idx = int(((text == soi) & (torch.arange(text.shape[1]) > 0))[:row].sum())
    assert rel_err(feats[0], golden["text_features"][idx]) <= 1e-6
