"""Packed rows (doc_ids/position_ids) give each document the result it gets alone; image blocks option."""

from __future__ import annotations

import pytest
import torch

import lcl_fast
from tests._compare import assert_close
from tests.test_factory import TINY

DOC_A = [59, 5, 6, 7, 62, 61, 61, 61, 61, 63, 9, 60]  # text, then an image, then text
DOC_B = [59, 8, 62, 61, 61, 61, 61, 63, 60]


@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
def test_packed_row_equals_separate_rows(impl):
    torch.manual_seed(0)
    model = lcl_fast.create_model(TINY, impl=impl).eval()
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    length = TINY["text_cfg"]["context_length"]
    separate = torch.zeros(2, length, dtype=torch.long)
    separate[0, : len(DOC_A)] = torch.tensor(DOC_A)
    separate[1, : len(DOC_B)] = torch.tensor(DOC_B)
    packed = torch.zeros(1, length, dtype=torch.long)
    packed[0, : len(DOC_A) + len(DOC_B)] = torch.tensor(DOC_A + DOC_B)
    doc_ids = torch.full((1, length), -1)
    doc_ids[0, : len(DOC_A)] = 0
    doc_ids[0, len(DOC_A): len(DOC_A) + len(DOC_B)] = 1
    position_ids = torch.zeros(1, length, dtype=torch.long)
    position_ids[0, : len(DOC_A)] = torch.arange(len(DOC_A))
    position_ids[0, len(DOC_A): len(DOC_A) + len(DOC_B)] = torch.arange(len(DOC_B))

    want = model(images, separate)
    got = model(images, packed, doc_ids=doc_ids, position_ids=position_ids)
    assert torch.equal(got["labels"], want["labels"])  # no label across the document boundary
    for key in ("image_features", "text_features", "logits"):
        assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, name=key)


def test_document_opening_with_an_image_has_no_pair():
    model = lcl_fast.create_model(TINY, impl="torch")
    doc = [62, 61, 61, 61, 61, 63, 8, 60]
    packed = torch.zeros(1, 24, dtype=torch.long)
    packed[0, :16] = torch.tensor(doc + doc)
    doc_ids = torch.tensor([[0] * 8 + [1] * 8 + [-1] * 8])
    position_ids = torch.tensor([list(range(8)) * 2 + [0] * 8])
    out = model(torch.randn(2, 3, 16, 16), packed, doc_ids=doc_ids, position_ids=position_ids)
    assert out["image_features"].shape[0] == 0  # both images open their document: no preceding context


def test_image_bidirectional_option():
    torch.manual_seed(0)
    # Two layers: with one, text after the image sees only the image's inputs, which the option does not change.
    cfg = {**TINY, "text_cfg": {**TINY["text_cfg"], "layers": 2}}
    causal = lcl_fast.create_model(cfg, impl="torch")
    bidir = lcl_fast.create_model(cfg, impl="torch", image_bidirectional=True)
    bidir.load_state_dict(causal.state_dict())
    text = torch.zeros(1, 24, dtype=torch.long)
    text[0, : len(DOC_A)] = torch.tensor(DOC_A)
    ids = bidir.image_ids(torch.cat([text, text]))
    assert ids[0, 5:9].tolist() == [0] * 4 and ids[1, 5:9].tolist() == [1] * 4 and int((ids >= 0).sum()) == 8
    images = torch.randn(1, 3, 16, 16)
    a, b = causal(images, text), bidir(images, text)
    # The context before the image is untouched (the contrastive text feature); text after it changes.
    assert_close(b["text_features"], a["text_features"], rtol=1e-6, atol=1e-7, name="text_features")
    assert not torch.allclose(a["logits"][-2:], b["logits"][-2:])
