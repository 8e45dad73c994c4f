"""The training loader: sharding, equal steps, exact resume, workers, bad data, the built-in corpus."""

import json

import pytest
import torch

from lcl_fast.data import build_eval_pairs, build_train_loader
from lcl_fast.data.streams import SampleStream, StreamConfig
from lcl_fast.data.synthetic import ensure_corpus

from .fakes import (
    EOT,
    SOI,
    FakeTokenizer,
    doc,
    image_bytes,
    pair_members,
    truncated_jpeg,
    write_mmc4,
    write_pair_shards,
    write_tar,
)

TOK = FakeTokenizer()
SMALL = dict(batch_size=2, context_length=16, num_img_token=2, image_size=8, decoder="pil")


def _loader(kind, data, **kw):
    return build_train_loader(kind, data, TOK, **{**SMALL, **kw})


def _caption_keys(sizes):
    """Caption token tuple -> sample key of write_pair_shards' shards."""
    return {
        tuple(TOK.encode(f"caption {s} {i}")): f"s{s}_{i:03d}" for s, n in enumerate(sizes) for i in range(n)
    }


def _keys(batch, lookup):
    out = []
    for row in batch["text_ids"].tolist():
        words = tuple(t for t in row if 0 < t < 49406)
        out.append(lookup[words])
    return out


def _take(loader, n):
    out = []
    while len(out) < n:
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
    return out


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in ("text_ids", "doc_ids", "position_ids", "num_images", "images"):
            if x[k] is None or y[k] is None:
                assert x[k] is None and y[k] is None, k
            else:
                assert torch.equal(x[k], y[k]), k


def _check_images_match_tokens(batch):
    soi = batch["text_ids"] == SOI
    assert batch["images"].shape[0] == int(soi.sum())
    assert batch["num_images"].tolist() == soi.sum(1).tolist()


# ----------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("sizes, world, streams", [([3, 5, 2, 4, 1], 2, 1), ([7], 2, 1), ([4, 3, 6], 2, 2)])
def test_streams_cover_each_sample_once_per_data_epoch(tmp_path, sizes, world, streams):
    shards = write_pair_shards(tmp_path, sizes)
    cfg = StreamConfig(
        "webdataset", shards, sizes, TOK, 2, 16, 2, 8, world_size=world, streams_per_rank=streams
    )
    for epoch in (0, 1):
        seen = []
        for sid in range(world * streams):
            stream = SampleStream(cfg, sid, {"data_epoch": epoch, "shard_pos": 0, "offset": 0})
            while True:
                raw, _, _ = stream.next()
                if stream.data_epoch != epoch:
                    break
                seen.append(raw["key"])
        assert sorted(seen) == sorted(_caption_keys(sizes).values())
        if epoch == 0:
            first_order = seen
    assert seen != first_order  # reshuffled each data epoch


def test_two_ranks_split_an_epoch_and_take_equal_steps(tmp_path):
    sizes = [4, 4, 4, 4]
    write_pair_shards(tmp_path, sizes)
    lookup = _caption_keys(sizes)
    ranks = [_loader("webdataset", str(tmp_path), rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 4
    seen = [k for loader in ranks for batch in loader for k in _keys(batch, lookup)]
    assert sorted(seen) == sorted(lookup.values())

    uneven = tmp_path / "uneven"
    write_pair_shards(uneven, [9, 1, 1])
    ranks = [_loader("webdataset", str(uneven), rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    assert [sum(1 for _ in loader) for loader in ranks] == [2, 2]
    assert [sum(1 for _ in loader) for loader in ranks] == [2, 2]  # second epoch too
    assert ranks[0].epoch == ranks[1].epoch == 2


# ----------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def mmc4_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmc4")
    images = {f"i{k}.jpg": image_bytes(20, 18, seed=k) for k in range(30)}
    docs = []
    for d in range(14):
        n = 1 + d % 3
        sentences = [f"doc {d} sentence {j}" for j in range(n + 1)]
        docs.append(doc(sentences, [(f"i{(2 * d + j) % 30}.jpg", j + 1, 0.3) for j in range(n)]))
    return write_mmc4(root, [docs[:7], docs[7:]], images)


@pytest.mark.parametrize("kind, pack", [("webdataset", False), ("mmc4", True)])
def test_resume_reproduces_the_next_batches(tmp_path, mmc4_root, kind, pack):
    data = str(mmc4_root) if kind == "mmc4" else str(tmp_path)
    if kind == "webdataset":
        write_pair_shards(tmp_path, [5, 6, 3])
    opts = dict(pack=pack, seed=3, context_length=40 if pack else 16)
    whole = _loader(kind, data, **opts)
    n = 2 * len(whole) + 1
    reference = _take(whole, n)

    first = _loader(kind, data, **opts)
    stop = len(first) // 2 + 1
    part = _take(first, stop)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = _loader(kind, data, **opts)
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.step) == (0, stop)
    _same(part + _take(resumed, n - stop), reference)
    if pack:
        assert all(b["doc_ids"] is not None for b in reference)
        assert 0 < whole.padding_fraction < 1


def test_state_from_another_setup_is_refused(tmp_path):
    write_pair_shards(tmp_path, [4, 4])
    state = _loader("webdataset", str(tmp_path)).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        _loader("webdataset", str(tmp_path), batch_size=3).load_state_dict(state)
    with pytest.raises(ValueError, match="rank"):
        _loader("webdataset", str(tmp_path), rank=1, world_size=2).load_state_dict(state)


def test_same_seed_same_batches_other_seed_other_order(tmp_path):
    write_pair_shards(tmp_path, [6, 6])
    a, b, c = (_take(_loader("webdataset", str(tmp_path), seed=s), 4) for s in (1, 1, 2))
    _same(a, b)
    assert any(not torch.equal(x["text_ids"], y["text_ids"]) for x, y in zip(a, c))


def test_workers_match_the_serial_streams_and_resume(tmp_path):
    write_pair_shards(tmp_path, [5, 4, 6, 3])
    serial = _take(_loader("webdataset", str(tmp_path), streams_per_rank=2), 6)
    loader = _loader("webdataset", str(tmp_path), workers=2)
    part = _take(loader, 3)
    state = loader.state_dict()
    resumed = _loader("webdataset", str(tmp_path), workers=2)
    resumed.load_state_dict(state)
    _same(part + _take(resumed, 3), serial)


# ----------------------------------------------------------------------------- bad data


def test_bad_data_is_skipped_and_counted(tmp_path, mmc4_root):
    members = pair_members("a", "good one", 0) + [("b.jpg", b"not an image"), ("b.txt", b"corrupt")]
    members += [("c.jpg", truncated_jpeg()), ("c.txt", b"truncated jpeg")] + [("d.txt", b"no image")]
    members += pair_members("e", "good two", 1) + pair_members("f", "cut member", 2)[::-1]
    (tmp_path / "pairs").mkdir()
    write_tar(tmp_path / "pairs" / "s-0.tar", members, truncate_last=40)
    loader = _loader("webdataset", str(tmp_path / "pairs"), batch_size=1, steps_per_epoch=4)
    batches = _take(loader, 4)
    assert all(b["text_ids"].shape[0] == 1 for b in batches)
    counts = loader.skip_counts
    assert set(counts) == {"image_decode", "incomplete_sample", "tar_member"}
    assert counts["image_decode"] >= 2

    root = tmp_path / "mmc4"
    docs = [
        doc(["x y", "z"], [("ok.jpg", 1, 0.5), ("gone.jpg", 0, 0.5)]),
        "{broken",
        doc(["only missing"], [("gone.jpg", 0, 0.5)]),
        doc(["below"], [("ok.jpg", 0, 0.1)]),
    ]
    write_mmc4(root, [docs], {"ok.jpg": image_bytes(seed=5)})
    loader = _loader("mmc4", str(root), batch_size=1, context_length=30, steps_per_epoch=2)
    for batch in _take(loader, 2):
        _check_images_match_tokens(batch)
        assert batch["images"].shape[0] == 1
    assert set(loader.skip_counts) == {"image_missing", "jsonl_line", "doc_no_images"}
    with pytest.raises(RuntimeError, match="no usable sample"):
        bad = tmp_path / "allbad"
        write_mmc4(bad, [[docs[2], docs[3]]], {})
        _take(_loader("mmc4", str(bad), batch_size=1, context_length=30, num_samples=2), 1)


def test_an_unexpected_error_in_one_sample_is_counted_not_fatal(tmp_path):
    class Fussy(FakeTokenizer):
        def encode(self, text):
            if "poison" in text:
                raise RuntimeError("tokenizer bug")
            return super().encode(text)

    write_tar(tmp_path / "s.tar", pair_members("a", "fine", 0) + pair_members("b", "poison", 1))
    loader = build_train_loader(
        "webdataset", str(tmp_path), Fussy(), **{**SMALL, "batch_size": 1}, shuffle=False
    )
    assert [b["text_ids"].shape[0] for b in _take(loader, 3)] == [1, 1, 1]
    assert loader.skip_counts == {"error": 2}


def test_dali_failure_after_a_good_header_drops_the_row(tmp_path):
    pytest.importorskip("nvidia.dali")
    members = pair_members("a", "one", 0) + [("b.jpg", truncated_jpeg()), ("b.txt", b"two")]
    members += pair_members("c", "three", 2) + pair_members("d", "four", 3)
    write_tar(tmp_path / "s.tar", members)
    loader = _loader("webdataset", str(tmp_path), batch_size=4, decoder="dali", shuffle=False)
    (batch,) = _take(loader, 1)
    assert batch["text_ids"].shape[0] == 3 and batch["images"].shape == (3, 3, 8, 8)
    assert loader.skip_counts == {"image_decode": 1}
    pil = _loader("webdataset", str(tmp_path), batch_size=4, decoder="pil", shuffle=False)
    (batch,) = _take(pil, 1)  # PIL finds it while reading: the row is replaced by the next sample
    assert batch["text_ids"].shape[0] == 4 and pil.skip_counts == {"image_decode": 1}


def test_obelics_through_the_loader(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = {
        "texts": [["first text", None, "after"], [None, "x"], ["no image"]],
        "images": [[None, image_bytes(seed=1), None], [b"garbage", None], [None]],
    }
    pq.write_table(pa.table(rows), tmp_path / "s.parquet")
    loader = _loader(
        "obelics", str(tmp_path), batch_size=1, context_length=20, steps_per_epoch=3, shuffle=False
    )
    batches = _take(loader, 3)
    for b in batches:
        _check_images_match_tokens(b)
        assert b["text_ids"][0, 0].item() == 49406 and EOT in b["text_ids"][0].tolist()
    # three passes over [good, bad image, no image] stopping at the good row: the bad ones seen twice
    assert loader.skip_counts == {"doc_no_images": 4, "image_decode": 2}


def test_arguments_are_checked(tmp_path):
    write_pair_shards(tmp_path, [2])
    with pytest.raises(ValueError, match="rank 2 outside"):
        _loader("webdataset", str(tmp_path), rank=2, world_size=2)
    with pytest.raises(ValueError, match="cannot feed 4 streams"):
        _loader("webdataset", str(tmp_path), world_size=4)
    with pytest.raises(ValueError, match="needs train_data"):
        _loader("mmc4", None)
    with pytest.raises(ValueError, match="dataset_type"):
        _loader("csv", str(tmp_path))


# ----------------------------------------------------------------------------- built-in corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return ensure_corpus(tmp_path_factory.mktemp("cache"))


def test_corpus_layout_and_reuse(corpus, monkeypatch, tmp_path):
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert manifest["train_pairs"] == 2048 and manifest["eval_pairs"] == 200
    assert len(list((corpus / "pairs").glob("*.tar"))) == 4
    assert len(list((corpus / "mmc4" / "images").iterdir())) == manifest["images_in_docs"]
    stamp = (corpus / "manifest.json").stat().st_mtime_ns
    assert ensure_corpus(corpus.parent) == corpus and (corpus / "manifest.json").stat().st_mtime_ns == stamp
    # the default place: $LCL_FAST_CACHE/synthetic/v1 (found there, not rebuilt)
    (tmp_path / "synthetic").mkdir()
    (tmp_path / "synthetic" / "v1").symlink_to(corpus)
    monkeypatch.setenv("LCL_FAST_CACHE", str(tmp_path))
    assert ensure_corpus() == tmp_path / "synthetic" / "v1"
    assert (corpus / "manifest.json").stat().st_mtime_ns == stamp


def test_corpus_trains_through_the_real_readers(corpus):
    pairs = build_train_loader(
        "synthetic",
        None,
        TOK,
        batch_size=8,
        context_length=24,
        num_img_token=4,
        image_size=16,
        cache_dir=str(corpus.parent),
        decoder="pil",
    )
    assert len(pairs) == 2048 // 8
    docs = build_train_loader(
        "synthetic",
        "interleaved",
        TOK,
        batch_size=4,
        context_length=64,
        num_img_token=4,
        image_size=16,
        cache_dir=str(corpus.parent),
        decoder="pil",
        pack=True,
    )
    for batch in _take(pairs, 2) + _take(docs, 3):
        _check_images_match_tokens(batch)
        assert batch["images"].shape[1:] == (3, 16, 16)
    assert pairs.skip_counts == {} and docs.skip_counts == {}

    images, captions = build_eval_pairs(image_size=16, cache_dir=str(corpus.parent), decoder="pil")
    assert images.shape == (200, 3, 16, 16) and len(set(captions)) == 200
    assert all(c.split()[0] in ("a", "an", "two", "three") for c in captions)


def test_scene_captions():
    from lcl_fast.data.synthetic import Scene, all_scenes

    assert Scene("orange", "circle", "left", 1).caption == "an orange circle on the left"
    assert Scene("red", "square", "top", 2).caption == "two red squares at the top"
    assert Scene("blue", "triangle", "center", 3).caption == "three blue triangles in the center"
    assert len({s.caption for s in all_scenes()}) == 270


def test_many_shards_are_counted_from_a_sample_of_them(tmp_path):
    from lcl_fast.data.loader import count_samples

    shards = write_pair_shards(tmp_path / "many", [2] * 70)
    sizes, total = count_samples("webdataset", shards)
    assert sizes is None and total == 140  # estimated from 8 shards of the same size
    assert count_samples("webdataset", shards, exact=True) == ([2] * 70, 140)
    (tmp_path / "many" / "sizes.json").write_text(json.dumps({f"shard-{s:06d}.tar": 3 for s in range(70)}))
    assert count_samples("webdataset", shards) == ([3] * 70, 210)  # open_clip's sizes.json wins


def test_corpus_captions_describe_the_pictures(corpus):
    """The rendered colour and place are recoverable from the pixels: the text is learnable."""
    import io

    import numpy as np
    from PIL import Image

    from lcl_fast.data.readers import TarShard
    from lcl_fast.data.synthetic import COLORS, PLACES

    (path,) = (corpus / "eval").glob("*.tar")
    shard = TarShard(str(path))
    right_colour = right_place = 0
    for i in range(len(shard)):
        sample = shard.read(i)
        pixels = np.asarray(Image.open(io.BytesIO(sample["image"])).convert("RGB")).astype(float)
        background = np.median(pixels.reshape(-1, 3), axis=0)
        shape = np.abs(pixels - background).sum(-1) > 120
        mean = pixels[shape].mean(0)
        colour = min(COLORS, key=lambda c: np.abs(np.array(COLORS[c]) - mean).sum())
        ys, xs = np.nonzero(shape)
        cy, cx = ys.mean() / 64, xs.mean() / 64
        place = min(
            PLACES,
            key=lambda p: (
                (cx - (PLACES[p][0][0] + PLACES[p][0][2]) / 2) ** 2
                + (cy - (PLACES[p][0][1] + PLACES[p][0][3]) / 2) ** 2
            ),
        )
        right_colour += colour in sample["caption"].split()
        right_place += place in sample["caption"]
    assert right_colour >= 0.95 * len(shard) and right_place >= 0.95 * len(shard), (right_colour, right_place)
