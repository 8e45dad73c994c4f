"""The reference's sequence rules, against hand-built expectations."""

import random

import pytest
import torch

from lcl_fast.data.sequences import (
    InterleavedSequenceBuilder,
    PairedSequenceBuilder,
    select_mmc4_images,
)

from .fakes import EOI, EOT, IMG, SOI, SOT, FakeTokenizer

TOK = FakeTokenizer()


def ids(text):
    return TOK.encode(text)


def run(n):
    return [SOI, *[IMG] * n, EOI]


class _Fixed(random.Random):
    """An rng whose random() returns a given sequence (randrange still works)."""

    def __init__(self, values):
        super().__init__(0)
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


# ----------------------------------------------------------------------------- paired


def test_paired_text_first_and_image_first_layouts():
    b = PairedSequenceBuilder(TOK, context_length=20, num_img_token=3, img_first_prob=0.5)
    caption = "a red circle on the left"
    assert b(caption, _Fixed([0.7])) == [SOT, *ids(caption), *run(3)]
    assert b(caption, _Fixed([0.2])) == [*run(3), *ids(caption), EOT]


def test_paired_caption_cut_to_c_minus_n_minus_4():
    c, n = 17, 5
    b = PairedSequenceBuilder(TOK, context_length=c, num_img_token=n)
    words = " ".join(f"w{i}" for i in range(30))
    keep = ids(words)[: c - n - 4]
    assert len(keep) == 8
    first = b(words, _Fixed([0.0]))
    last = b(words, _Fixed([0.99]))
    assert first == [*run(n), *keep, EOT] and len(first) == c - 1
    assert last == [SOT, *keep, *run(n)] and len(last) == c - 1


def test_paired_image_first_probability():
    b = PairedSequenceBuilder(TOK, context_length=16, num_img_token=2, img_first_prob=0.3)
    firsts = sum(b("x", random.Random(s))[0] == SOI for s in range(4000))
    assert abs(firsts / 4000 - 0.3) < 0.03
    always = PairedSequenceBuilder(TOK, 16, 2, img_first_prob=1.0)
    assert all(always("x", random.Random(s))[0] == SOI for s in range(50))


@pytest.mark.parametrize("c, n", [(6, 3), (4, 1), (10, 0)])
def test_paired_rejects_no_room(c, n):
    with pytest.raises(ValueError, match=f"context_length {c}"):
        PairedSequenceBuilder(TOK, c, n)


# ----------------------------------------------------------------------------- selecting MMC4 images


def info(name, ix, sim):
    return {"image_name": name, "matched_text_index": ix, "matched_sim": sim}


def test_select_threshold_sort_and_cap():
    infos = [info("a", 5, 0.30), info("b", 1, 0.24), info("c", 0, 0.2399), info("d", 3, 0.9)]
    infos += [info(f"x{k}", 6 + k, 0.5) for k in range(6)]
    chosen, bad = select_mmc4_images(infos, 20, random.Random(0))
    # 0.24 kept, 0.2399 dropped; sorted by sentence; first 6 kept
    assert chosen == [(1, "b"), (3, "d"), (5, "a"), (6, "x0"), (7, "x1"), (8, "x2")]
    assert bad == 0


def test_select_one_image_per_sentence_random_among_duplicates():
    infos = [info("p", 2, 0.3), info("q", 0, 0.3), info("r", 2, 0.3), info("s", 2, 0.3)]
    picks = set()
    for seed in range(60):
        chosen, _ = select_mmc4_images(infos, 3, random.Random(seed))
        assert [ix for ix, _ in chosen] == [0, 2]
        # one draw per sentence: randrange(1) for sentence 0, then randrange(3) among p, r, s (stable order)
        expect = random.Random(seed)
        expect.randrange(1)
        assert chosen[1][1] == ["p", "r", "s"][expect.randrange(3)]
        picks.add(chosen[1][1])
    assert picks == {"p", "r", "s"}


def test_select_counts_malformed_entries():
    infos = [
        info("ok", 0, 0.5),
        info("past_end", 4, 0.5),
        {"image_name": "no_fields"},
        "junk",
        info("neg", -1, 0.5),
        info("bool", True, 0.5),
        info("sim", 0, "high"),
    ]
    chosen, bad = select_mmc4_images(infos, 4, random.Random(0))
    assert chosen == [(0, "ok")]
    assert bad == 6


# ----------------------------------------------------------------------------- building documents


def test_interleaved_before_and_after_placement():
    b = InterleavedSequenceBuilder(TOK, context_length=64, num_img_token=2)
    sentences = ["one two", "three", "four five six"]
    got, kept = b.from_sentences(sentences, [0, 2], [True, False])
    expect = [SOT, *run(2), *ids("one two"), *ids("three"), *ids("four five six"), *run(2), EOT]
    assert (got, kept) == (expect, 2)
    got, kept = b.from_sentences(sentences, [1], [False])
    assert got == [SOT, *ids("one two"), *ids("three"), *run(2), *ids("four five six"), EOT] and kept == 1


def test_interleaved_placement_draws():
    b = InterleavedSequenceBuilder(TOK, 64, 2, img_first_prob=0.5)
    assert b.placements(3, _Fixed([0.1, 0.6, 0.49])) == [True, False, True]


def test_truncation_in_text_keeps_eot_last():
    b = InterleavedSequenceBuilder(TOK, context_length=12, num_img_token=2)
    sentences = ["a b", "c d e f g h i j"]
    got, kept = b.from_sentences(sentences, [0], [False])
    full = [SOT, *ids("a b"), *run(2), *ids("c d e f g h i j"), EOT]
    assert len(full) > 12
    assert got == [*full[:11], EOT] and len(got) == 12 and kept == 1


def test_truncation_through_an_image_cuts_at_its_start():
    b = InterleavedSequenceBuilder(TOK, context_length=14, num_img_token=4)
    sentences = ["a b", "c d e"]
    # <sot> a b [soi 4xIMG eoi] c d e [soi IMG...]: the second run starts at 11, cut at 13
    got, kept = b.from_sentences(sentences, [0, 1], [False, False])
    assert got == [SOT, *ids("a b"), *run(4), *ids("c d e"), EOT]
    assert kept == 1


def test_truncation_that_only_drops_the_end_of_img_keeps_the_image():
    # The reference counts <img_placehold> tokens only: a run missing just its <end_of_img>
    # (overwritten by <eot>) is complete for it, and kept.
    b = InterleavedSequenceBuilder(TOK, context_length=9, num_img_token=4)
    got, kept = b.from_sentences(["a b"], [0], [False])
    assert got == [SOT, *ids("a b"), SOI, IMG, IMG, IMG, IMG, EOT]
    assert kept == 1


def test_document_without_a_whole_image_is_dropped():
    b = InterleavedSequenceBuilder(TOK, context_length=10, num_img_token=4)
    # the only image starts at 8: cut through it -> no image left -> dropped
    assert b.from_sentences(["a b c d e f g", "x"], [0], [False]) is None
    # no image at all
    assert b.from_pieces(["just text"]) is None
    # image entirely past the end
    assert b.from_sentences(["a b c d e f g h i j k", "x"], [1], [True]) is None


def test_from_pieces_obelics_order():
    b = InterleavedSequenceBuilder(TOK, context_length=40, num_img_token=1)
    got, kept = b.from_pieces([None, "hello world", None, "bye"])
    assert got == [SOT, *run(1), *ids("hello world"), *run(1), *ids("bye"), EOT] and kept == 2


def test_long_document_stops_encoding_once_full():
    calls = []

    class Counting(FakeTokenizer):
        def encode(self, text):
            calls.append(text)
            return super().encode(text)

    b = InterleavedSequenceBuilder(Counting(), context_length=16, num_img_token=2)
    sentences = [f"s{k} " * 5 for k in range(100)]
    got, kept = b.from_sentences(sentences, [0], [True])
    assert len(got) == 16 and got[-1] == EOT and kept == 1
    assert len(calls) < 10


def test_matches_the_reference_string_method_with_the_real_tokenizer():
    """The reference splices image-token strings into the text and tokenizes it whole."""
    from lcl_fast.data.tokenizer import get_tokenizer

    tok = get_tokenizer()
    n, c = 3, 40
    b = InterleavedSequenceBuilder(tok, c, n)
    subseq = " <start_of_img> " + "<img_placehold> " * n + "<end_of_img> "
    docs = [
        (
            ["Hello there, world!", "It's a café & bar.", "Numbers: 12345 and more.", "Bye."],
            [0, 2],
            [True, False],
        ),
        (["A long sentence " * 4, "second one", "third one " * 3], [1, 2], [False, True]),
        (["tiny", "x&amp;y", "end"], [0], [False]),
    ]
    for sentences, image_ixs, before in docs:
        text = list(sentences)
        for ix, first in zip(image_ixs, before):
            text[ix] = subseq + text[ix] if first else text[ix] + subseq
        ref = tok(" ".join(text), c)[0].tolist()
        # the reference's truncation rule on its ids
        n_soi = ref.count(tok.soi_token_id)
        if n_soi * n != ref.count(tok.img_token_id):
            last = max(i for i, t in enumerate(ref) if t == tok.soi_token_id)
            ref = ref[:last] + [tok.eot_token_id] + [0] * (c - last - 1)
        got = b.from_sentences(sentences, image_ixs, before)
        ref_len = max(i for i, t in enumerate(ref) if t != 0) + 1
        assert got is not None and got[0] == ref[:ref_len], (sentences, got, ref)


# lcl_fast.build_paired_text: the public route to the paired layout (README "Drop-in use").


def test_build_paired_text_layout():
    import lcl_fast

    tok = lcl_fast.get_tokenizer(context_length=12)
    got = lcl_fast.build_paired_text(tok, ["a red circle", "a cat"], 3, image_first=[False, True])
    assert got.dtype == torch.int64 and got.shape == (2, 12)
    caption0, caption1 = tok.encode("a red circle"), tok.encode("a cat")
    row0 = [tok.sot_token_id, *caption0, tok.soi_token_id, *[tok.img_token_id] * 3, tok.eoi_token_id]
    row1 = [tok.soi_token_id, *[tok.img_token_id] * 3, tok.eoi_token_id, *caption1, tok.eot_token_id]
    assert got[0].tolist() == row0 + [0] * (12 - len(row0))
    assert got[1].tolist() == row1 + [0] * (12 - len(row1))
    # one flag for all, a single caption, and the training builder's cut (C - N - 4 caption ids)
    long = "one two three four five six seven eight"
    cut = lcl_fast.build_paired_text(tok, long, 3, image_first=True)
    row = PairedSequenceBuilder(tok, 12, 3, img_first_prob=1.0)(long, random.Random(0))
    assert len(row) < 12 and cut[0].tolist() == row + [0] * (12 - len(row))


def test_build_paired_text_feeds_the_model():
    import lcl_fast

    torch.manual_seed(0)
    model = lcl_fast.create_model("LCL_tiny")
    tok = lcl_fast.get_tokenizer("LCL_tiny")
    text = lcl_fast.build_paired_text(tok, ["a red circle", "a blue square"], model.num_img_token)
    assert text.shape == (2, tok.context_length)
    out = model(torch.rand(2, 3, *model.visual.image_size), text)
    assert out["image_features"].shape[0] == 2 and out["text_features"].shape[0] == 2  # both rows paired


def test_build_paired_text_errors():
    import lcl_fast

    tok = lcl_fast.get_tokenizer(context_length=12)
    with pytest.raises(ValueError, match="image_first has 1 entries for 2 captions"):
        lcl_fast.build_paired_text(tok, ["a", "b"], 3, image_first=[True])
    with pytest.raises(TypeError, match="item 1 is a int"):
        lcl_fast.build_paired_text(tok, ["a", 5], 3)
    with pytest.raises(ValueError, match="context_length 12 and num_img_token 9"):
        lcl_fast.build_paired_text(tok, ["a"], 9)
