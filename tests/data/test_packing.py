"""Packing keeps every token, image and generation label of every document."""

import random

import pytest
import torch

from lcl_fast.data.packing import Row, RowPacker, collate, drop_rows, row_of_image

from .fakes import EOI, EOT, IMG, SOI, SOT


def _labels(text_ids, doc_ids):
    """The generation loss's (label) sequence per document: t predicts t+1 unless the label is an
    image placeholder, <end_of_img> or pad, or t+1 starts another document (model.generation_targets)."""
    out = []
    for b in range(text_ids.shape[0]):
        ids = text_ids[b].tolist()
        docs = doc_ids[b].tolist() if doc_ids is not None else [0] * len(ids)
        per_doc = {}
        for t in range(len(ids) - 1):
            if ids[t + 1] in (IMG, EOI, 0) or docs[t + 1] != docs[t]:
                continue
            per_doc.setdefault(docs[t], []).append((ids[t], ids[t + 1]))
        out.extend(per_doc[d] for d in sorted(per_doc) if d >= 0)
    return out


def _random_rows(n, context, seed):
    rng = random.Random(seed)
    rows = []
    for k in range(n):
        images = rng.randint(1, 2)
        body = []
        for _ in range(images):
            body += [rng.randint(1, 999) for _ in range(rng.randint(0, 5))] + [SOI, IMG, IMG, EOI]
        tokens = [SOT, *body, *[rng.randint(1, 999) for _ in range(rng.randint(0, 9))], EOT][:context]
        rows.append(Row(tokens, [f"img{k}_{j}" for j in range(tokens.count(SOI))]))
    return rows


def test_first_fit_closes_at_first_misfit():
    rows = [Row([1] * n) for n in (6, 5, 4, 3, 2, 7)]
    p = RowPacker(batch_size=2, context_length=10, pack=True)
    # 6 | 5 open two bins; 4 -> bin 0 (10), 3 -> bin 1 (8), 2 -> bin 1 (10); 7 fits nowhere
    assert [p.add(r) for r in rows] == [True, True, True, True, True, False]
    assert [[len(r.tokens) for r in b] for b in p.bins] == [[6, 4], [5, 3, 2]]
    assert p.full()


def test_unpacked_is_one_row_each():
    p = RowPacker(batch_size=3, context_length=10, pack=False)
    assert [p.add(Row([1, 2])) for _ in range(4)] == [True, True, True, False]
    assert p.full() and [len(b) for b in p.take()] == [1, 1, 1]


def test_row_longer_than_context_is_an_error():
    with pytest.raises(ValueError, match="exceeds context_length 4"):
        RowPacker(2, 4, pack=True).add(Row([1] * 5))


@pytest.mark.parametrize("context, batch", [(32, 3), (17, 5), (64, 1)])
def test_packing_preserves_tokens_images_and_labels(context, batch):
    rows = _random_rows(40, context, seed=context)
    packed_batches, single_batches = [], []
    for pack, out in ((True, packed_batches), (False, single_batches)):
        p = RowPacker(batch, context, pack)
        for r in rows:
            if not p.add(r):
                out.append(collate(p.take(), context, pack))
                assert p.add(r)
        out.append(collate(p.take(), context, pack))

    images_of = {tuple(r.tokens): r.images for r in rows}
    assert len(images_of) == len(rows)  # rows are distinct, so each packed document names its source
    docs_packed, labels_packed = [], []
    for b in packed_batches:
        t, d, pos = b["text_ids"], b["doc_ids"], b["position_ids"]
        assert t.shape == d.shape == pos.shape and t.shape[1] == context
        images = iter(b["images"])
        for r in range(t.shape[0]):
            for doc in range(int(d[r].max()) + 1):
                sel = d[r] == doc
                tokens = t[r][sel].tolist()
                docs_packed.append(tokens)
                # the images, in row-major order, are this document's own
                assert [next(images) for _ in range(tokens.count(SOI))] == images_of[tuple(tokens)]
                # positions restart at 0 and count up inside each document
                assert pos[r][sel].tolist() == list(range(int(sel.sum())))
            pad = d[r] < 0
            assert (t[r][pad] == 0).all() and (pos[r][pad] == 0).all()
            # padding only at the end
            assert not pad.any() or bool(pad[int(pad.nonzero()[0]) :].all())
        assert next(images, None) is None
        assert b["num_images"].sum() == len(b["images"])
        labels_packed += _labels(t, d)
        assert b["pad_tokens"] == int((d < 0).sum())

    # every row packed exactly once, whole; the generation labels of each document unchanged
    assert sorted(docs_packed) == sorted(r.tokens for r in rows)
    labels_single = [lab for b in single_batches for lab in _labels(b["text_ids"], None)]
    assert sorted(labels_packed) == sorted(labels_single)
    assert sum(len(b["text_ids"]) for b in packed_batches) < sum(len(b["text_ids"]) for b in single_batches)


def test_images_follow_row_major_order():
    rows = [Row([SOT, SOI, IMG, EOI, EOT], ["a"]), Row([SOT, SOI, IMG, EOI, SOI, IMG, EOI, EOT], ["b", "c"])]
    out = collate([[rows[1]], [rows[0]]], 12, packed=False)
    assert out["images"] == ["b", "c", "a"] and out["num_images"].tolist() == [2, 1]
    assert out["doc_ids"] is None and out["position_ids"] is None
    assert row_of_image(out["num_images"]) == [0, 0, 1]
    left = drop_rows(out, [0])
    assert left["text_ids"].tolist() == [rows[0].tokens + [0] * 7] and left["num_images"].tolist() == [1]
    assert torch.equal(out["text_ids"][1], left["text_ids"][0])
