"""The LCL tokenizer against the reference's ids (golden/tokenizer.json) and its own contract."""

from __future__ import annotations

import html
import json
import pickle
import random

import ftfy
import pytest
import torch

from lcl_fast.data.tokenizer import (
    MODEL_CONTEXT_LENGTHS,
    Tokenizer,
    clean_text,
    get_tokenizer,
    text_features_ids,
)

SOT, EOT, IMG, SOI, EOI = 49406, 49407, 49408, 49409, 49410


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return get_tokenizer()


@pytest.fixture(scope="module")
def golden(golden_dir) -> dict:
    return json.loads((golden_dir / "tokenizer.json").read_text(encoding="utf-8"))


def _mismatches(cases, actual_of) -> list[str]:
    return [
        f"{c['text']!r}: got {actual}, expected {expected}"
        for c in cases
        for actual, expected in [actual_of(c)]
        if actual != expected
    ]


def test_golden_encode(tok, golden):
    assert tok.vocab_size == golden["vocab_size"] == 49411
    bad = _mismatches(golden["cases"], lambda c: (tok.encode(c["text"]), c["encode"]))
    assert not bad, "\n".join(bad)


def test_golden_call_ctx64(tok, golden):
    bad = _mismatches(golden["cases"], lambda c: (tok([c["text"]], 64)[0].tolist(), c["ids_ctx64"]))
    assert not bad, "\n".join(bad)


def test_list_input_matches_rows(tok, golden):
    texts = [c["text"] for c in golden["cases"]]
    ids = tok(texts, 64)
    assert ids.dtype == torch.long and ids.shape == (len(texts), 64)
    assert ids.tolist() == [c["ids_ctx64"] for c in golden["cases"]]
    assert torch.equal(tok(tuple(texts), 64), ids)
    assert torch.equal(tok(texts[3], 64), ids[3:4])  # a single string is one row
    assert tok([], 64).shape == (0, 64)


def test_every_lowercase_word_symbol_is_one_id(tok):
    # Every letters-only end-of-word symbol of the CLIP vocabulary must merge back into itself:
    # exercises the merge loop on ~33k words of 1-20 letters.
    words = [
        (s[: -len("</w>")], i)
        for s, i in tok._bpe.id_of.items()
        if s.endswith("</w>") and s[:-4].isascii() and s[:-4].isalpha() and s[:-4].islower()
    ]
    assert len(words) > 30_000
    bad = [(w, i, tok.encode(w)) for w, i in words if tok.encode(w) != [i]]
    assert not bad, f"{len(bad)} words split, first: {bad[:5]}"


@pytest.mark.parametrize("context_length", [2, 3, 17, 64, 130])
def test_truncation_keeps_eot_last(tok, context_length):
    text = " ".join(f"word{i} costs ${i}.{i % 7}" for i in range(60))
    ids = tok.encode(text)
    assert len(ids) > 130
    row = tok(text, context_length)[0].tolist()
    assert row == [SOT, *ids[: context_length - 2], EOT]


def test_exact_fit_and_one_over(tok):
    ids = tok.encode("a photo of a cat")  # 5 ids
    assert tok("a photo of a cat", 7)[0].tolist() == [SOT, *ids, EOT]
    assert tok("a photo of a cat", 8)[0].tolist() == [SOT, *ids, EOT, 0]
    assert tok("a photo of a cat", 6)[0].tolist() == [SOT, *ids[:4], EOT]


def test_context_length_defaults(tok):
    assert tok("hi").shape == (1, 77)
    for name, length in MODEL_CONTEXT_LENGTHS.items():
        named = get_tokenizer(name)
        assert named.context_length == length and named("hi").shape == (1, length)
    assert MODEL_CONTEXT_LENGTHS == {
        "LCL_ViT-B-16_laion": 280,
        "LCL_ViT-B-32_laion": 128,
        "LCL_ViT-B-32_mmc4": 2048,
    }
    assert get_tokenizer("LCL_ViT-B-32_mmc4", context_length=33)("hi").shape == (1, 33)
    with pytest.raises(ValueError, match="LCL_ViT-B-32_laion"):
        get_tokenizer("ViT-B-32")
    with pytest.raises(ValueError, match="ViT-B-32"):
        get_tokenizer("ViT-B-32", context_length=77)


@pytest.mark.parametrize("bad", [0, 1, -5, 2.5, "77"])
def test_bad_context_length(tok, bad):
    with pytest.raises(ValueError, match="context_length"):
        tok("hi", bad)


def test_non_string_text(tok):
    with pytest.raises(TypeError, match="item 1"):
        tok(["ok", 3])


def test_special_tokens(tok):
    assert tok.special_token_ids == {
        "<start_of_text>": SOT,
        "<end_of_text>": EOT,
        "<img_placehold>": IMG,
        "<start_of_img>": SOI,
        "<end_of_img>": EOI,
    }
    assert (tok.sot_token_id, tok.eot_token_id, tok.img_token_id) == (SOT, EOT, IMG)
    assert (tok.soi_token_id, tok.eoi_token_id, tok.pad_token_id) == (SOI, EOI, 0)
    tok.special_token_ids["<end_of_img>"] = -1  # a caller's copy; the next tokenizer is intact
    assert get_tokenizer().special_token_ids["<end_of_img>"] == EOI


def test_image_tokens_inside_text(tok):
    a, b = tok.encode("a"), tok.encode("b")
    assert tok.encode("a<img_placehold>b") == [*a, IMG, *b]
    assert tok.encode("<START_OF_IMG><Img_Placehold><end_of_img>") == [SOI, IMG, EOI]  # lower-cased first
    assert SOI not in tok.encode("<start_of_img")  # only the whole token is special


def test_for_retrieval(tok):
    ids = tok.encode("a photo of a dog")
    assert tok.for_retrieval("a photo of a dog", 10)[0].tolist() == [SOT, *ids, SOI, 0, 0, 0]
    long_text = "a photo of a dog " * 20
    for length in (2, 9, 77):
        row = tok.for_retrieval(long_text, length)[0].tolist()
        assert row == [SOT, *tok.encode(long_text)[: length - 2], SOI]
    texts = ["a photo of a dog", long_text, "x"]
    expected = tok(texts, 12)
    expected[expected == EOT] = SOI
    assert torch.equal(tok.for_retrieval(texts, 12), expected)
    assert torch.equal(text_features_ids(texts, 12), expected)
    assert text_features_ids("x").shape == (1, 77)


@pytest.mark.parametrize(
    "text", ["a photo of a cat", "two dogs playing in the snow", "supercalifragilisticexpialidocious", "x"]
)
def test_decode_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text + " "  # the reference ends every word with a space
    assert tok.decode(torch.tensor(tok.encode(text))) == text + " "


def test_decode_specials_and_errors(tok):
    assert tok.decode([SOT, *tok.encode("hi"), EOT]) == "<start_of_text>hi <end_of_text>"
    assert tok.decode([SOI, IMG, EOI]) == "<start_of_img><img_placehold><end_of_img>"
    assert tok.decode(tok.encode("naïve café 😀")) == "naïve café 😀 "
    with pytest.raises(ValueError, match="49411"):
        tok.decode([5, 49411])
    with pytest.raises(ValueError, match="-1"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="shape"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))


def _reference_clean(text: str) -> str:
    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split()).lower()


def test_clean_fast_path_matches_ftfy():
    rng = random.Random(0)
    ascii_chars = [chr(i) for i in range(128)]
    pieces = [
        "&amp;",
        "&lt;b&gt;",
        "&AMP;",
        "&#39;",
        "Ã©",
        "â€™",
        "ﬁ",
        "Ａ",
        "\u00a0",
        "\r\n",
        "\x0b",
        "\x1b[31m",
    ]
    texts = []
    for _ in range(3000):
        kind = rng.randrange(3)
        if kind == 0:  # printable ASCII but "&", tab, newline, CR: the fast path
            texts.append("".join(rng.choice(" \t\n\rabcXYZ019.,!?'<>/;#%") for _ in range(rng.randrange(40))))
        elif kind == 1:  # any ASCII, control characters included
            texts.append("".join(rng.choice(ascii_chars) for _ in range(rng.randrange(40))))
        else:  # entities, mojibake, compatibility characters
            texts.append(" ".join(rng.choice([*pieces, "Cat", "dog"]) for _ in range(rng.randrange(8))))
    bad = [(t, clean_text(t), _reference_clean(t)) for t in texts if clean_text(t) != _reference_clean(t)]
    assert not bad, f"{len(bad)} differ, first: {bad[:3]}"
    assert clean_text("a\x0bb") == "ab"  # ftfy drops vertical tab; a plain split would not
    assert clean_text("  Fish &amp; CHIPS\t") == "fish & chips"


def test_pickle_round_trip():
    tok = get_tokenizer("LCL_ViT-B-32_laion")
    blob = pickle.dumps(tok)
    assert len(blob) < 1000  # arguments only, not the vocabulary
    copy = pickle.loads(blob)
    assert copy.context_length == 128
    assert torch.equal(copy(["a cat <img_placehold>"]), tok(["a cat <img_placehold>"]))


def test_tokenizer_takes_its_settings_from_a_config():
    from lcl_fast.data.tokenizer import tokenizer_from_config

    cfg = {"text_cfg": {"context_length": 40}, "special_token_ids": {"<start_of_img>": 49409}}
    assert tokenizer_from_config(cfg).context_length == 40
    assert tokenizer_from_config(cfg, context_length=12).context_length == 12
    assert tokenizer_from_config(None).context_length == 77
    with pytest.raises(ValueError, match=r"special_token_ids \{'<start_of_img>': 7\} differ"):
        tokenizer_from_config({"special_token_ids": {"<start_of_img>": 7}})
