"""Evaluation runs text at a few padded lengths (so a GPU compiles/tunes attention a few times),
with features exactly those of the unpadded text."""

from __future__ import annotations

import torch

import lcl_fast
from lcl_fast.data import get_tokenizer
from lcl_fast.eval import common
from lcl_fast.eval.common import encode_texts, text_bucket

# captions of 1 to ~40 words: trimmed lengths 3 ... ~44 tokens, most of them distinct
TEXTS = [" ".join(["a", "red", "picture", "of", "something", "blue"] * 8)[: 6 * n] for n in range(1, 40, 3)]


def test_text_bucket_is_a_power_of_two_from_32_up_to_the_context_length():
    assert [text_bucket(n, 77) for n in (1, 31, 32, 33, 64, 65, 77)] == [32, 32, 32, 64, 64, 77, 77]
    assert [text_bucket(n, 2048) for n in (100, 129, 1500, 2048)] == [128, 256, 2048, 2048]
    assert text_bucket(5, 16) == 16


def _run(model, tokenizer, texts, batch_size):
    seen: list[int] = []
    hook = model.text.transformer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    try:
        return encode_texts(model, tokenizer, texts, batch_size=batch_size), set(seen)
    finally:
        hook.remove()


def test_triton_eval_text_lengths_are_buckets_and_features_are_the_same_bits(monkeypatch):
    torch.manual_seed(0)
    model = lcl_fast.create_model("LCL_tiny", impl="triton").eval()
    tokenizer = get_tokenizer(context_length=model.text.context_length)
    texts = TEXTS[::3]  # five texts, one per batch: the interpreter is slow
    padded, seen = _run(model, tokenizer, texts, 1)
    trimmed = {int((tokenizer([t], 64) != 0).sum()) for t in texts}
    assert len(trimmed) == len(texts) and seen <= {32, 64}, (sorted(trimmed), sorted(seen))

    monkeypatch.setattr(common, "text_bucket", lambda length, context_length: length)  # as before: unpadded
    unpadded, seen = _run(model, tokenizer, texts, 1)
    assert seen == trimmed
    assert torch.equal(padded, unpadded)


def test_torch_eval_text_runs_trimmed():
    """No kernel to tune on the torch path, and its CPU attention sums in a length-dependent order."""
    torch.manual_seed(0)
    model = lcl_fast.create_model("LCL_tiny", impl="torch").eval()
    tokenizer = get_tokenizer(context_length=model.text.context_length)
    _, seen = _run(model, tokenizer, TEXTS[:4], 2)
    assert seen == {int((tokenizer(TEXTS[i:i + 2], 64) != 0).any(0).nonzero().max()) + 1 for i in (0, 2)}
