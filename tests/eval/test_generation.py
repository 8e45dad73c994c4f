"""Decoding from LCL's language model: the functional text tower, the KV cache, ragged prompts, beams, stops."""

from __future__ import annotations

import pytest
import torch

import lcl_fast
from lcl_fast.generation import _full_mask, _run_blocks, _State, generate

SOI, IMG, EOI, EOT = 49409, 49408, 49410, 49407


@pytest.fixture(scope="module")
def model64():
    """LCL_tiny in float64: argmax ties cannot differ by rounding between the compared paths."""
    torch.manual_seed(0)
    return lcl_fast.create_model("LCL_tiny", impl="torch").eval().double()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


PROMPTS = [[], [320, 1746], [320, 736, 2445, 1085, 518]]  # ragged, as the tokenizer writes ids


def test_functional_tower_matches_the_training_forward(model64, images):
    """The blocks run by generation.py give the logits the model's forward gives at the same positions."""
    caption = [320, 736, 2445, 1085, 518, 1253]
    text = torch.tensor([[SOI, *[IMG] * 16, EOI, *caption, EOT]] * 3)
    expected = model64(images, text)["logits"]  # rows: predictions of caption tokens and <eot>
    state = _State(model64, images, [caption + [EOT]] * 3, 1, use_cache=False)
    hidden = _run_blocks(model64, state.prefix_embs, state.positions, _full_mask(state.valid, None), None, 0)
    got = model64.lm_head(hidden)[:, 17:-1].reshape(-1, expected.shape[-1])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # decoding's LM head (a pre-transposed weight) is the module's
    assert state._head_t is not None
    torch.testing.assert_close(state._logits(hidden[:, -2]), expected.view(3, -1, expected.shape[-1])[:, -1])


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_and_uncached_decoding_agree_token_for_token(model64, images, num_beams):
    cached = generate(model64, images, PROMPTS, max_new_tokens=12, num_beams=num_beams)
    uncached = generate(model64, images, PROMPTS, max_new_tokens=12, num_beams=num_beams, use_cache=False)
    assert cached.shape == (3, 12)
    assert torch.equal(cached, uncached)


def test_ragged_prompts_decode_as_each_row_alone(model64, images):
    """Left padding with per-row positions: a row in a ragged batch decodes as it would alone."""
    batch = generate(model64, images, PROMPTS, max_new_tokens=10)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(model64, images[i : i + 1], [prompt], max_new_tokens=10)
        assert torch.equal(batch[i : i + 1], alone), i
    padded = torch.zeros(3, 5, dtype=torch.long)  # the tensor form: 0 is padding
    for i, p in enumerate(PROMPTS):
        padded[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    assert torch.equal(generate(model64, images, padded, max_new_tokens=10), batch)


def test_beam_one_is_greedy_and_beams_search_the_top_k(model64, images):
    greedy = model64.generate(images, PROMPTS, max_new_tokens=8)
    assert torch.equal(generate(model64, images, PROMPTS, max_new_tokens=8, num_beams=1, use_cache=True), greedy)
    # Beam 1 through the beam-search code path (not the greedy shortcut) gives the greedy tokens.
    from lcl_fast.generation import _beam, _suppressed

    state = _State(model64, images, PROMPTS, 8, use_cache=True)
    rows = _beam(state, 8, 1, EOT, _suppressed(model64), 1.0)
    assert torch.equal(torch.tensor(rows), greedy)

    # Two steps of beam search with K beams: the best first-token-among-the-top-K plus best second token.
    from lcl_fast.generation import _log_probs

    k = 4
    banned = _suppressed(model64)
    state = _State(model64, images, PROMPTS, 2, use_cache=False)
    first = _log_probs(state.prefill(), banned)
    top_lp, top_tok = first.topk(k, dim=1)
    best = torch.full((3,), float("-inf"), dtype=torch.float64)
    choice = torch.zeros(3, 2, dtype=torch.long)
    for j in range(k):
        s = _State(model64, images, PROMPTS, 2, use_cache=False)
        s.prefill()
        second = _log_probs(s.step(top_tok[:, j]), banned)
        lp2, tok2 = second.max(1)
        total = top_lp[:, j].double() + lp2.double()
        better = total > best
        best = torch.where(better, total, best)
        choice[better] = torch.stack([top_tok[:, j], tok2], 1)[better]
    assert torch.equal(generate(model64, images, PROMPTS, max_new_tokens=2, num_beams=k), choice)


class _StopAt(torch.nn.Module):
    """An lm_head that makes image i (its rows: one, or its beams in order) say <eot> at call ``stops[i]``."""

    def __init__(self, head, stops):
        super().__init__()
        self.head, self.stops, self.calls = head, stops, 0

    def forward(self, h):
        out = self.head(h)
        per = h.shape[0] // len(self.stops)  # the prefill runs one row per image, later steps one per beam
        for i, stop in enumerate(self.stops):
            if self.calls == stop:
                out[i * per : (i + 1) * per, EOT] = 1e4
        self.calls += 1
        return out


@pytest.mark.parametrize("num_beams,use_cache", [(1, True), (1, False), (2, True)])
def test_rows_stop_at_end_of_text(model64, images, num_beams, use_cache):
    head = model64.lm_head
    model64.lm_head = _StopAt(head, [2, 0, 4])
    try:
        out = generate(model64, images, PROMPTS, max_new_tokens=10, num_beams=num_beams, use_cache=use_cache)
        calls = model64.lm_head.calls
    finally:
        model64.lm_head = head
    assert out.shape == (3, 5)  # the longest row ends at its <eot>
    for i, stop in enumerate([2, 0, 4]):
        assert out[i, stop] == EOT and (out[i, :stop] != EOT).all() and (out[i, stop + 1 :] == 0).all()
    # Greedy decoding ends once every row has finished; beam search once each image has `num_beams`
    # finished hypotheses (image 1 finished its only live beam at the first step: it runs to the limit).
    assert calls == (5 if num_beams == 1 else 10)


def test_generation_limits_and_errors(model64, images):
    # LCL_tiny: context 64, an image takes 18 tokens, so at most 46 new tokens follow an empty prompt.
    assert generate(model64, images[:1], max_new_tokens=500).shape[1] <= 46
    with pytest.raises(ValueError, match="images must be"):
        generate(model64, images[:, :, :16], max_new_tokens=2)
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        generate(model64, images, [[1], [2]], max_new_tokens=2)
    with pytest.raises(ValueError, match="no room to generate"):
        generate(model64, images[:1], [[320] * 46], max_new_tokens=2)
    out = generate(model64, images, max_new_tokens=6)
    banned = {0, 49406, SOI, IMG, EOI}
    assert not any(t in banned for t in out[out != 0].tolist())


def test_caption_returns_strings(model64, images):
    tok = lcl_fast.get_tokenizer(context_length=64)
    texts = lcl_fast.caption(model64, tok, images, prompt="a", max_new_tokens=5, batch_size=2)
    ids = model64.generate(images, [tok.encode("a")] * 3, max_new_tokens=5)
    assert texts == [tok.decode([t for t in row if t not in (0, EOT)]).strip() for row in ids.tolist()]
    assert all(isinstance(t, str) and t for t in texts)


def test_caption_decodes_pil_images_and_paths_generation_takes_tensors(tmp_path):
    """generation.py takes decoded images (or a decode function); lcl_fast.caption passes the data layer's."""
    from PIL import Image

    from lcl_fast.data.decode import eval_images
    from lcl_fast.generation import caption

    torch.manual_seed(0)
    model = lcl_fast.create_model("LCL_tiny", impl="torch").eval()
    tok = lcl_fast.get_tokenizer(context_length=64)
    pics = [Image.new("RGB", (40, 36), rgb) for rgb in ((200, 30, 30), (30, 200, 30))]
    pics[1].save(tmp_path / "green.png")
    expected = caption(model, tok, eval_images(pics, 32), max_new_tokens=3)
    assert lcl_fast.caption(model, tok, [pics[0], tmp_path / "green.png"], max_new_tokens=3) == expected
    with pytest.raises(TypeError, match="pass decode="):
        caption(model, tok, pics, max_new_tokens=3)
