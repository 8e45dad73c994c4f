"""interleaved_attention: every impl against a float64 dense-mask oracle, outputs and gradients.

Without CUDA the Triton kernels run under the interpreter: ``TRITON_INTERPRET=1`` is set here,
before anything imports :mod:`lcl_fast.kernels.attention` (Triton reads the variable when a
kernel is decorated, and the ops import the kernel module lazily, on first use). A session
that imported the kernels earlier without it gets a clear failure from ``_triton_ready``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from lcl_fast.ops.attention import dense_attention_mask, interleaved_attention  # noqa: E402
from tests._compare import assert_close, rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float64 agreement of two exact paths, and per-dtype tolerances for the rest
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


# ------------------------------------------------------------------------------ helpers


def oracle(q, k, v, doc_ids, image_ids, causal, scale=None):
    """Float64 attention under a mask built element by element from the definition."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    batch, _, length, dim = q.shape
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    allowed = torch.ones(batch, length, length, dtype=torch.bool)
    for b in range(batch):
        if causal:
            vis = j <= i
            if image_ids is not None:
                img = image_ids[b].cpu()
                vis = vis | ((img[:, None] == img[None, :]) & (img[:, None] >= 0))
            allowed[b] &= vis
        if doc_ids is not None:
            doc = doc_ids[b].cpu()
            allowed[b] &= (doc[:, None] == doc[None, :]) & (doc[:, None] >= 0) & (doc[None, :] >= 0)
    scores = (q.cpu() @ k.cpu().transpose(-1, -2)) * (dim**-0.5 if scale is None else scale)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows that see nothing: zero
    return probs @ v.cpu(), (q, k, v)


def random_metadata(gen, batch, length, *, docs=True, images=True, pad=True):
    """Several documents per row, images of different lengths inside them, trailing padding.

    The last row of a batch of 3 or more is all padding (no valid key anywhere).
    """
    doc_ids = torch.full((batch, length), -1, dtype=torch.long)
    image_ids = torch.full((batch, length), -1, dtype=torch.long)
    for b in range(batch):
        if pad and batch >= 3 and b == batch - 1:
            continue
        end = length - int(torch.randint(0, max(1, length // 5) + 1, (1,), generator=gen)) if pad else length
        start, doc, image = 0, int(torch.randint(0, 5, (1,), generator=gen)), 0
        while start < end:
            n = int(torch.randint(1, max(2, length // 2), (1,), generator=gen))
            stop = min(end, start + n) if docs else end
            doc_ids[b, start:stop] = doc
            pos = start
            while images and pos < stop:
                pos += int(torch.randint(0, 12, (1,), generator=gen))
                size = int(torch.randint(1, 13, (1,), generator=gen))
                if pos >= stop:
                    break
                image_ids[b, pos : min(stop, pos + size)] = image
                image, pos = image + 1, pos + size
            start, doc = stop, doc + 1 + int(torch.randint(0, 3, (1,), generator=gen))
    return (doc_ids if docs or pad else None), (image_ids if images else None)


def qkv(gen, shape, dtype, *, layout="contiguous"):
    batch, heads, length, dim = shape
    if layout == "packed":  # views into one [B, L, 3, H, D] projection, as the module makes them
        packed = torch.randn(batch, length, 3, heads, dim, generator=gen, dtype=torch.float64)
        return [t.to(DEVICE, dtype).requires_grad_() for t in packed.permute(2, 0, 3, 1, 4).unbind(0)]
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype).requires_grad_()
            for _ in range(3)]


def run(impl, q, k, v, doc_ids, image_ids, causal, grad, **kwargs):
    to = (lambda t: None if t is None else t.to(DEVICE))
    out = interleaved_attention(q, k, v, doc_ids=to(doc_ids), image_ids=to(image_ids), causal=causal,
                                impl=impl, **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype), allow_unused=True)
    # a batch of padding only leaves k and v unused (the torch path): their gradient is zero
    return out, tuple(torch.zeros_like(t) if g is None else g for t, g in zip((q, k, v), grads))


def _triton_ready():
    if DEVICE == "cpu":
        import lcl_fast.kernels.attention as kernels
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(kernels._attn_fwd, InterpretedFunction):
            pytest.fail("lcl_fast.kernels.attention was imported before TRITON_INTERPRET=1 was set")


def check_against_oracle(impl, shape, dtype, doc_ids, image_ids, causal, *, seed, layout="contiguous",
                         **kwargs):
    gen = torch.Generator().manual_seed(seed)
    if impl == "triton":
        _triton_ready()
    q, k, v = qkv(gen, shape, dtype, layout=layout)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    expected, leaves = oracle(q, k, v, doc_ids, image_ids, causal, kwargs.get("softmax_scale"))
    expected_grads = torch.autograd.grad(expected, leaves, grad)
    out, grads = run(impl, q, k, v, doc_ids, image_ids, causal, grad.to(DEVICE), **kwargs)
    assert out.dtype == dtype and out.shape == shape
    tol = TOL[dtype]
    assert_close(out, expected, rtol=tol, atol=tol, name=f"{impl} out")
    for name, g, e in zip("qkv", grads, expected_grads):
        assert_close(g, e, rtol=tol, atol=tol * max(1.0, float(e.abs().max())), name=f"{impl} d{name}")
    if doc_ids is not None:  # padding: zero output, no gradient to or from it
        pad = (doc_ids < 0)[:, None, :, None].expand(shape).to(DEVICE)
        assert (out.detach()[pad] == 0).all()
        for g in grads:
            assert (g[pad] == 0).all()
    return out, grads, expected, expected_grads


# -------------------------------------------------------------------------------- tests

MODES = {
    "plain": dict(docs=False, images=False, pad=False),
    "docs": dict(docs=True, images=False, pad=True),
    "images": dict(docs=False, images=True, pad=False),
    "docs+images": dict(docs=True, images=True, pad=True),
}


@pytest.mark.parametrize("impl", ["torch", "reference", "triton"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length", [1, 17, 64])
def test_matches_oracle(impl, mode, causal, length):
    gen = torch.Generator().manual_seed(1000 + length)
    doc_ids, image_ids = random_metadata(gen, 3, length, **MODES[mode])
    check_against_oracle(impl, (3, 2, length, 32), torch.float32, doc_ids, image_ids, causal, seed=length)


@pytest.mark.parametrize("impl", ["torch", "reference", "triton"])
@pytest.mark.parametrize("mode,causal", [("plain", True), ("docs+images", True), ("docs", False)])
def test_matches_oracle_long(impl, mode, causal):
    """L = 200: several full tiles, partial last tiles, documents and images across tile edges."""
    gen = torch.Generator().manual_seed(7)
    doc_ids, image_ids = random_metadata(gen, 2, 200, **MODES[mode])
    check_against_oracle(impl, (2, 2, 200, 32), torch.float32, doc_ids, image_ids, causal, seed=3)


@pytest.mark.parametrize("blocks", [(16, 32), (32, 16), (64, 16)])
@pytest.mark.parametrize("head_dim", [16, 24, 64])
def test_triton_tiles_and_head_dims(blocks, head_dim):
    """Unequal query/key tiles (the loop bounds round differently) and a head dim that is no power of 2."""
    gen = torch.Generator().manual_seed(11)
    doc_ids, image_ids = random_metadata(gen, 2, 90, docs=True, images=True, pad=True)
    check_against_oracle("triton", (2, 1, 90, head_dim), torch.float32, doc_ids, image_ids, True, seed=5,
                         blocks=blocks)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_float16_no_worse_than_twice_torch(impl):
    """Half precision: within tolerance of float64, and the kernel within 2x the torch path's error."""
    gen = torch.Generator().manual_seed(21)
    doc_ids, image_ids = random_metadata(gen, 2, 64, docs=True, images=True, pad=True)
    out, grads, expected, expected_grads = check_against_oracle(
        impl, (2, 2, 64, 32), torch.float16, doc_ids, image_ids, True, seed=8
    )
    if impl == "triton":
        base, base_grads, _, _ = check_against_oracle(
            "torch", (2, 2, 64, 32), torch.float16, doc_ids, image_ids, True, seed=8
        )
        assert rel_err(out, expected) <= 2 * rel_err(base, expected) + 1e-3
        for g, b, e in zip(grads, base_grads, expected_grads):
            assert rel_err(g, e) <= 2 * rel_err(b, e) + 1e-3


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_packed_views_and_scale(impl):
    """Strided q, k, v (views of one packed projection) and a custom softmax scale."""
    gen = torch.Generator().manual_seed(4)
    doc_ids, image_ids = random_metadata(gen, 2, 48, docs=True, images=True, pad=True)
    check_against_oracle(impl, (2, 3, 48, 32), torch.float32, doc_ids, image_ids, True, seed=9,
                         layout="packed", softmax_scale=0.3)


@pytest.mark.parametrize("impl", ["torch", "reference", "triton"])
def test_scattered_documents_and_images(impl):
    """Ids need not be contiguous runs: a document resumes after another, an image is split."""
    length = 40
    doc_ids = torch.tensor([[0] * 10 + [1] * 10 + [0] * 10 + [-1] * 5 + [1] * 5])
    image_ids = torch.full((1, length), -1)
    image_ids[0, 2:5] = 7
    image_ids[0, 22:24] = 7  # same image, second run, same document 0
    image_ids[0, 12:16] = 3
    check_against_oracle(impl, (1, 2, length, 32), torch.float32, doc_ids, image_ids, True, seed=2)
    check_against_oracle(impl, (1, 2, length, 32), torch.float32, doc_ids, image_ids, False, seed=2)


def test_torch_plain_causal_is_the_reference_in_float64():
    gen = torch.Generator().manual_seed(0)
    q, k, v = qkv(gen, (2, 4, 33, 16), torch.float64)
    grad = torch.randn(2, 4, 33, 16, generator=gen, dtype=torch.float64)
    out_t, grads_t = run("torch", q, k, v, None, None, True, grad)
    out_r, grads_r = run("reference", q, k, v, None, None, True, grad)
    assert_close(out_t, out_r, rtol=1e-12, atol=1e-12, name="out")
    for g_t, g_r in zip(grads_t, grads_r):
        assert_close(g_t, g_r, rtol=1e-12, atol=1e-12, name="grad")


def test_dense_mask_matches_definition():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, -1]])
    image_ids = torch.tensor([[-1, 4, 4, 5, 5, -1]])
    mask = dense_attention_mask(6, doc_ids=doc_ids, image_ids=image_ids, causal=True)[0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0],
    ]


def test_metadata_table_bounds():
    """The per-token bounds the kernels read cover every visible pair and nothing else is promised."""
    from lcl_fast.kernels.attention_launch import prepare_metadata

    gen = torch.Generator().manual_seed(3)
    doc_ids, image_ids = random_metadata(gen, 3, 70, docs=True, images=True, pad=True)
    doc_ids[0, 30:35] = doc_ids[0, 0]  # a scattered document
    for causal in (True, False):
        meta = prepare_metadata(doc_ids, image_ids, causal, 70)
        table = meta.table.long()
        allowed = dense_attention_mask(70, doc_ids=doc_ids, image_ids=image_ids, causal=causal)
        qi, kj = torch.meshgrid(torch.arange(70), torch.arange(70), indexing="ij")
        for b in range(3):
            ok = allowed[b]
            assert (kj[ok] >= table[2, b][qi[ok]]).all() and (kj[ok] < table[3, b][qi[ok]]).all()
            assert (qi[ok] >= table[4, b][kj[ok]]).all() and (qi[ok] < table[5, b][kj[ok]]).all()
            # same document id <=> same table id
            same_doc = doc_ids[b][:, None] == doc_ids[b][None, :]
            valid = doc_ids[b] >= 0
            same_tab = table[0, b][:, None] == table[0, b][None, :]
            assert (same_doc == same_tab)[valid][:, valid].all()
            # a span (fully visible tiles) only for the tokens of a contiguous document
            for i in range(70):
                pos = (doc_ids[b] == doc_ids[b, i]).nonzero().flatten()
                contiguous = bool(doc_ids[b, i] >= 0) and int(pos[-1] - pos[0] + 1) == len(pos)
                span = (int(pos[0]), int(pos[-1]) + 1) if contiguous else (70, 0)
                assert (int(table[6, b, i]), int(table[7, b, i])) == span
        assert ((table[6, 0] == 70) & (doc_ids[0] >= 0)).any()  # the scattered document has no span


def test_metadata_cache_sees_in_place_changes():
    """Reusing the table across layers must not hide an edit of the ids."""
    _triton_ready()
    gen = torch.Generator().manual_seed(5)
    q, k, v = qkv(gen, (1, 1, 20, 16), torch.float32)
    doc_ids = torch.zeros(1, 20, dtype=torch.long, device=DEVICE)
    first = interleaved_attention(q, k, v, doc_ids=doc_ids, impl="triton")
    doc_ids[0, 10:] = 1
    second = interleaved_attention(q, k, v, doc_ids=doc_ids, impl="triton")
    expected, _ = oracle(q, k, v, doc_ids.cpu(), None, True)
    assert_close(second, expected, rtol=2e-5, atol=2e-5, name="after edit")
    assert not torch.allclose(first, second)


def test_bad_inputs():
    q = torch.zeros(1, 2, 5, 8)
    with pytest.raises(ValueError, match=r"\[B, H, L, D\]"):
        interleaved_attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="same shape"):
        interleaved_attention(q, q, q[:, :, :4])
    with pytest.raises(ValueError, match=r"\[1, 5\]"):
        interleaved_attention(q, q, q, doc_ids=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integers"):
        interleaved_attention(q, q, q, image_ids=torch.zeros(1, 5))
    with pytest.raises(ValueError, match="dtype"):
        interleaved_attention(q, q.double(), q)
    with pytest.raises(ValueError, match="impl"):
        interleaved_attention(q, q, q, impl="flash")


def test_gpu_tile_candidates_fit():
    """The GPU-only plumbing (autotuner, pruning per target) builds and keeps only fitting tiles."""
    import lcl_fast.kernels.attention_launch as kernels
    from lcl_fast.kernels import tiles

    for kind in ("fwd", "dkdv", "dq"):
        tuned = kernels._tuned(kind)
        assert tuned.keys == ["L", "HEAD_DIM", "IS_CAUSAL", "HAS_DOC", "HAS_IMG"]
        for target in tiles.AOT_TARGETS.values():
            for head_dim in (32, 64, 128):
                for dtype in (torch.bfloat16, torch.float32):
                    prune = kernels._pruner(kind, target)
                    kept = prune(tuned.configs, {"Q": torch.zeros(1, dtype=dtype)}, HEAD_DIM=head_dim)
                    assert kept
                    want = tiles.attention_candidates(target, kind, dtype, head_dim)
                    got = [tiles.AttnTile(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                           for c in kept]
                    assert set(got) == set(want), (kind, target, head_dim, dtype)
                    for t in got:
                        shared = tiles.attention_shared_bytes(target, kind, t, dtype, head_dim)
                        assert shared <= target.shared_limit, (kind, target, head_dim, dtype, t)


@pytest.mark.parametrize("env,tuned", [(None, False), ("0", False), ("1", True)])
def test_gpu_launch_uses_the_audited_tile_unless_autotuning_is_asked(monkeypatch, env, tuned):
    """Training and eval run the device's audited tile; LCL_FAST_AUTOTUNE=1 hands the launch to the autotuner."""
    import lcl_fast.kernels.attention_launch as launch
    from lcl_fast.kernels import tiles

    calls = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.name, kwargs))

    monkeypatch.setattr(launch, "triton_interpreter", lambda: False)  # as on a GPU
    monkeypatch.setattr(tiles, "device_target", lambda device=None: tiles.AOT_TARGETS["sm_90"])
    monkeypatch.setattr(launch, "_tuned", lambda kind: Recorder("tuned"))
    if env is None:
        monkeypatch.delenv("LCL_FAST_AUTOTUNE", raising=False)
    else:
        monkeypatch.setenv("LCL_FAST_AUTOTUNE", env)
    q = torch.zeros(1, 1, 1, 64, dtype=torch.bfloat16).expand(2, 12, 280, 64)
    launch._launch("dkdv", Recorder("fixed"), 280, 24, (q,), {"HEAD_DIM": 64}, None)
    assert len(calls) == 1
    name, kwargs = calls[0]
    if tuned:
        assert name == "tuned" and "BLOCK_M" not in kwargs
    else:
        tile = tiles.attention_tile(tiles.AOT_TARGETS["sm_90"], "dkdv", torch.bfloat16, 64)
        assert name == "fixed"
        assert (kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["num_warps"], kwargs["num_stages"]) == tuple(tile)
