"""MultiheadSelfAttention: the reference's parameters and numbers, through every impl."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported (see tests/ops)

import pytest  # noqa: E402
from torch import nn  # noqa: E402

from lcl_fast.nn.attention import MultiheadSelfAttention  # noqa: E402
from lcl_fast.ops.attention import dense_attention_mask  # noqa: E402
from tests._compare import assert_close  # noqa: E402


def make(width=48, heads=3, impl="torch", seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    module = MultiheadSelfAttention(width, heads, impl=impl).to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-zero biases so that every parameter matters
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
    return module


def open_clip_attention(module):
    """The reference's layer: nn.MultiheadAttention with the same weights, batch first."""
    ref = nn.MultiheadAttention(module.width, module.heads, batch_first=True).to(module.in_proj_weight.dtype)
    ref.load_state_dict(module.state_dict())
    return ref


def forward_backward(module_or_fn, x, grad):
    x = x.detach().clone().requires_grad_()
    out = module_or_fn(x)
    out.backward(grad)
    return out.detach(), x.grad


def test_state_dict_is_nn_multihead_attention():
    module = MultiheadSelfAttention(64, 4)
    ref = nn.MultiheadAttention(64, 4)
    ours = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours == theirs
    assert set(ours) == {"in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"}
    module.load_state_dict(ref.state_dict())


def test_initialisation_like_nn_multihead_attention():
    module = MultiheadSelfAttention(64, 4)
    assert (module.in_proj_bias == 0).all() and (module.out_proj.bias == 0).all()
    bound = (6 / (64 + 3 * 64)) ** 0.5  # xavier_uniform on [3W, W]
    assert module.in_proj_weight.abs().max() <= bound
    assert module.in_proj_weight.abs().max() > 0.9 * bound
    assert module.out_proj.weight.abs().max() <= 64**-0.5  # nn.Linear's default init


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length", [1, 17])
def test_reference_impl_is_open_clip(causal, length):
    """impl='reference': the exact numbers of nn.MultiheadAttention with the float -inf mask."""
    module = make(impl="reference")
    ref = open_clip_attention(module)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, length, 48, generator=gen, dtype=torch.float64)
    grad = torch.randn(3, length, 48, generator=gen, dtype=torch.float64)
    mask = torch.full((length, length), float("-inf"), dtype=torch.float64).triu(1) if causal else None
    out_r, gx_r = forward_backward(lambda t: ref(t, t, t, need_weights=False, attn_mask=mask)[0], x, grad)
    out, gx = forward_backward(lambda t: module(t, causal=causal), x, grad)
    assert_close(out, out_r, rtol=1e-15, atol=1e-15, name="out")
    assert_close(gx, gx_r, rtol=1e-15, atol=1e-15, name="dx")


@pytest.mark.parametrize("causal", [True, False])
def test_torch_impl_matches_reference_float64(causal):
    ref = make(impl="reference")
    module = make(impl="torch")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 30, 48, generator=gen, dtype=torch.float64)
    grad = torch.randn(2, 30, 48, generator=gen, dtype=torch.float64)
    out_r, gx_r = forward_backward(lambda t: ref(t, causal=causal), x, grad)
    out, gx = forward_backward(lambda t: module(t, causal=causal), x, grad)
    assert_close(out, out_r, rtol=1e-12, atol=1e-12, name="out")
    assert_close(gx, gx_r, rtol=1e-12, atol=1e-12, name="dx")
    ref_grads = torch.autograd.grad(ref(x, causal=causal), list(ref.parameters()), grad)
    grads = torch.autograd.grad(module(x, causal=causal), list(module.parameters()), grad)
    for (name, _), g, g_r in zip(module.named_parameters(), grads, ref_grads):
        assert_close(g, g_r, rtol=1e-12, atol=1e-12, name=name)


def test_triton_impl_matches_reference():
    ref = make(impl="reference", dtype=torch.float32)
    module = make(impl="triton", dtype=torch.float32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref, module = ref.to(device), module.to(device)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 40, 48, generator=gen).to(device)
    grad = torch.randn(2, 40, 48, generator=gen).to(device)
    out_r, gx_r = forward_backward(ref, x, grad)
    out, gx = forward_backward(module, x, grad)
    assert_close(out, out_r, rtol=2e-5, atol=2e-5, name="out")
    assert_close(gx, gx_r, rtol=2e-5, atol=2e-5, name="dx")


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_packed_rows_with_images(impl):
    """doc_ids / image_ids reach the attention: each document of a packed row is its own sequence."""
    module = make(impl=impl)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 24, 48, generator=gen, dtype=torch.float64)
    doc_ids = torch.tensor([[0] * 10 + [1] * 11 + [-1] * 3])
    image_ids = torch.full((1, 24), -1)
    image_ids[0, 3:7] = 0
    image_ids[0, 14:18] = 1
    out = module(x, doc_ids=doc_ids, image_ids=image_ids)
    # the first document alone, images bidirectional: the same rows
    alone = module(x[:, :10], image_ids=image_ids[:, :10])
    assert_close(out[:, :10], alone, rtol=1e-12, atol=1e-12, name="document 0")
    alone = module(x[:, 10:21], image_ids=image_ids[:, 10:21])
    assert_close(out[:, 10:21], alone, rtol=1e-12, atol=1e-12, name="document 1")
    # padding rows: attention output zero, so the layer gives the out_proj bias there
    assert_close(out[0, 21:], module.out_proj.bias.expand(3, 48), rtol=0, atol=1e-15, name="padding")
    # an image token sees the later tokens of its image
    allowed = dense_attention_mask(24, doc_ids=doc_ids, image_ids=image_ids)
    assert allowed[0, 3, 6] and not allowed[0, 7, 8]


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of heads"):
        MultiheadSelfAttention(50, 3)
    with pytest.raises(ValueError, match="impl"):
        MultiheadSelfAttention(48, 3, impl="flash")
    with pytest.raises(ValueError, match=r"\[B, L, 48\]"):
        MultiheadSelfAttention(48, 3)(torch.zeros(2, 5, 32))
