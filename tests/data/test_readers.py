"""Shard readers on tiny generated shards, bad data included."""

import json
import os
import zipfile

import pytest

from lcl_fast.data.readers import Mmc4Shard, TarShard, open_shard, shard_size
from lcl_fast.data.shards import INDEX_SUFFIX, expand_shards
from lcl_fast.data.skips import BadSample, SkipCounter

from .fakes import doc, image_bytes, pair_members, write_mmc4, write_pair_shards, write_tar


def _read_all(shard):
    good, bad = [], []
    for i in range(len(shard)):
        try:
            good.append(shard.read(i))
        except BadSample as e:
            bad.append(e.kind)
    return good, bad


# ----------------------------------------------------------------------------- shard lists


def test_expand_folder_brace_and_list(tmp_path):
    a = write_pair_shards(tmp_path / "a", [1, 1, 1])
    b = write_pair_shards(tmp_path / "b", [1, 1], prefix="other")
    (tmp_path / "a" / "notes.txt").write_text("not a shard")
    assert expand_shards(str(tmp_path / "a"), "webdataset") == a
    pattern = str(tmp_path / "a" / "shard-{000000..000002}.tar")
    assert expand_shards(pattern, "webdataset") == a
    assert expand_shards(f"{pattern}::{tmp_path / 'b'}", "webdataset") == a + b
    with pytest.raises(ValueError, match="holds no webdataset shards"):
        expand_shards(str(tmp_path), "webdataset")
    with pytest.raises(ValueError, match="dataset_type"):
        expand_shards(pattern, "csv")


def test_expand_mmc4_root_uses_data_folder(tmp_path):
    write_mmc4(tmp_path, [[doc(["x"], [])], [doc(["y"], [])]], {})
    shards = expand_shards(str(tmp_path), "mmc4")
    assert [os.path.basename(s) for s in shards] == ["docs_shard_0_v2.jsonl.zip", "docs_shard_1_v2.jsonl.zip"]


# ----------------------------------------------------------------------------- webdataset


def test_tar_reader_good_and_bad_members(tmp_path):
    members = pair_members("k0", "first caption", 0)
    members += pair_members("k1", "png caption", 1, ext="png")
    members += [
        ("k2.jpg", b"\xff\xd8 not really a jpeg"),
        ("k2.txt", b"corrupt image"),
    ]  # read fine, decode fails
    members += [("k3.jpg", image_bytes(seed=3)), ("k3.json", json.dumps({"caption": "from json"}).encode())]
    members += [("k4.jpg", image_bytes(seed=4))]  # no caption
    members += [("k5.txt", b"\xff\xfe bad utf-8")] + [("k5.jpg", image_bytes(seed=5))]
    members += [("dir/k6.txt", b"nested key"), ("dir/k6.jpg", image_bytes(seed=6))]
    members += pair_members("k7", "last, truncated", 7)[::-1]  # the image last: its data is cut
    path = write_tar(tmp_path / "s.tar", members, truncate_last=50)

    shard = TarShard(str(path))
    good, bad = _read_all(shard)
    assert [(g["key"], g["caption"]) for g in good] == [
        ("k0", "first caption"),
        ("k1", "png caption"),
        ("k2", "corrupt image"),
        ("k3", "from json"),
        ("dir/k6", "nested key"),
    ]
    assert good[0]["image"] == dict(members)["k0.jpg"]
    assert sorted(bad) == ["caption", "incomplete_sample", "tar_member"]


def _listing(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_tar_index_lives_in_the_cache_and_is_rebuilt_when_the_shard_changes(tmp_path, monkeypatch):
    shards = tmp_path / "shards"
    shards.mkdir()
    path = write_tar(shards / "s.tar", pair_members("a", "x", 0))
    monkeypatch.setenv("LCL_FAST_CACHE", str(tmp_path / "cache"))
    assert len(TarShard(str(path))) == 1
    assert _listing(shards) == ["s.tar"]  # nothing written beside the user's shard
    (index,) = (tmp_path / "cache" / "index").iterdir()
    assert index.name.startswith("s.tar.") and index.name.endswith(INDEX_SUFFIX)
    assert json.loads(index.read_text())["samples"][0][0] == "a"
    index.write_text(index.read_text().replace('"a"', '"from-the-cache"'))  # reused, not rebuilt:
    assert TarShard(str(path)).read(0)["key"] == "from-the-cache"
    write_tar(path, pair_members("a", "x", 0) + pair_members("b", "y", 1))  # the shard changes
    assert len(TarShard(str(path))) == 2
    assert len(list((tmp_path / "cache" / "index").iterdir())) == 2  # a new index, keyed by size/mtime
    assert _listing(shards) == ["s.tar"]
    # --cache-dir: the indexes go there instead
    assert shard_size("webdataset", str(path), str(tmp_path / "mine")) == 2
    assert [p.parent.name for p in (tmp_path / "mine").rglob("*" + INDEX_SUFFIX)] == ["index"]


def test_jsonl_count_is_indexed_in_the_cache(tmp_path, monkeypatch):
    root = write_mmc4(tmp_path / "m", [[doc(["x"], []), doc(["y"], [])]], {})
    before = _listing(root)
    monkeypatch.setenv("LCL_FAST_CACHE", str(tmp_path / "cache"))
    assert shard_size("mmc4", str(root / "data" / "docs_shard_0_v2.jsonl.zip")) == 2
    assert _listing(root) == before
    assert len(list((tmp_path / "cache" / "index").glob("docs_shard_0_v2.jsonl.zip.*" + INDEX_SUFFIX))) == 1


def test_tar_with_a_damaged_header_keeps_the_other_samples(tmp_path):
    members = pair_members("a", "one", 0) + pair_members("b", "two", 1) + pair_members("c", "three", 2)
    path = write_tar(tmp_path / "s.tar", members)
    raw = bytearray(path.read_bytes())
    header_of_b_jpg = raw.index(b"b.jpg")
    raw[header_of_b_jpg : header_of_b_jpg + 100] = b"\x07" * 100  # garbage over b.jpg's header
    path.write_bytes(bytes(raw))
    shard = TarShard(str(path))
    good, bad = _read_all(shard)
    assert [g["caption"] for g in good] == ["one", "three"]
    assert bad == ["incomplete_sample"] and shard.bad_headers == 1


def test_unreadable_tar_is_a_bad_shard(tmp_path):
    with pytest.raises(BadSample) as e:
        TarShard(str(tmp_path / "missing.tar"))
    assert e.value.kind == "shard_unreadable"
    assert shard_size("webdataset", str(tmp_path / "missing.tar")) == 0


# ----------------------------------------------------------------------------- mmc4


@pytest.mark.parametrize("zipped", [True, False])
def test_mmc4_reader(tmp_path, zipped):
    docs = [
        doc(["a", "b"], [("x.jpg", 0, 0.3)]),
        "{not json",
        doc(["c"], [("gone.jpg", 0, 0.5)]),
        json.dumps({"text_list": "not a list", "image_info": []}),
        "",
    ]
    write_mmc4(tmp_path, [docs], {"x.jpg": image_bytes(seed=1)}, zipped=zipped)
    (path,) = expand_shards(str(tmp_path), "mmc4")
    shard = Mmc4Shard(path)
    assert len(shard) == 4  # the empty line is no document
    good, bad = _read_all(shard)
    assert [g["text_list"] for g in good] == [["a", "b"], ["c"]]
    assert bad == ["jsonl_line", "jsonl_line"]
    assert shard.read_image("x.jpg") == image_bytes(seed=1)
    for name, kind in (("gone.jpg", "image_missing"), ("../data/x.jpg", "image_info"), (None, "image_info")):
        with pytest.raises(BadSample) as e:
            shard.read_image(name)
        assert e.value.kind == kind
    assert shard_size("mmc4", path) == 4


def test_corrupt_zip_is_a_bad_shard(tmp_path):
    path = tmp_path / "data" / "docs_shard_0_v2.jsonl.zip"
    path.parent.mkdir()
    path.write_bytes(b"PK not a zip")
    with pytest.raises(BadSample) as e:
        open_shard("mmc4", str(path))
    assert e.value.kind == "shard_unreadable"


# ----------------------------------------------------------------------------- obelics


def test_parquet_reader(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    with_bytes = {
        "texts": [["hello", None, "world"], [None, "text"], ["bad"], [None, None]],
        "images": [[None, image_bytes(seed=8), None], [image_bytes(seed=7), None], [None, None], None],
    }
    pq.write_table(pa.table(with_bytes), tmp_path / "b.parquet", row_group_size=2)
    shard = open_shard("obelics", str(tmp_path / "b.parquet"))
    assert len(shard) == 4 and shard.blocks == [(0, 2), (2, 2)]
    good, bad = _read_all(shard)
    assert [g["texts"] for g in good] == [["hello", None, "world"], [None, "text"]]
    assert bad == ["parquet_row", "parquet_row"]  # lists of different lengths; no images list
    assert shard.read_image(good[0]["images"][1]) == image_bytes(seed=8)
    assert shard_size("obelics", str(tmp_path / "b.parquet")) == 4

    (tmp_path / "img.png").write_bytes(image_bytes(seed=9, fmt="PNG"))
    with_paths = {
        "texts": [["x", None], [None, "y"]],
        "images": [[None, "img.png"], ["https://a.org/b.jpg", None]],
    }
    pq.write_table(pa.table(with_paths), tmp_path / "p.parquet")
    shard = open_shard("obelics", str(tmp_path / "p.parquet"))
    (first, second), _ = _read_all(shard)
    assert shard.read_image(first["images"][1]) == image_bytes(seed=9, fmt="PNG")
    assert shard.read_image({"bytes": None, "path": "img.png"}) == image_bytes(seed=9, fmt="PNG")
    for ref, kind in ((second["images"][0], "image_url"), ("nope.png", "image_missing"), (3, "parquet_row")):
        with pytest.raises(BadSample) as e:
            shard.read_image(ref)
        assert e.value.kind == kind


# ----------------------------------------------------------------------------- skip counter


def test_skip_counter_rate_limits_the_log(caplog):
    counter = SkipCounter(interval_s=3600)
    with caplog.at_level("WARNING", logger="lcl_fast.data"):
        for _ in range(50):
            counter.add("image_decode", "bad")
        counter.add("jsonl_line", "bad line")
    assert counter.snapshot() == {"image_decode": 50, "jsonl_line": 1}
    assert len(caplog.records) == 2


def test_damaged_zip_data_is_a_bad_shard(tmp_path):
    docs = [doc([f"sentence {i} " * 20], []) for i in range(50)]
    write_mmc4(tmp_path, [docs], {})
    (path,) = expand_shards(str(tmp_path), "mmc4")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("docs_shard_0_v2.jsonl", "".join(json.dumps(d) + "\n" for d in docs))
    raw = bytearray(open(path, "rb").read())
    for k in range(60, 200):
        raw[k] ^= 0x5A  # scramble the deflate stream (the central directory stays intact)
    open(path, "wb").write(bytes(raw))
    with pytest.raises(BadSample) as e:
        open_shard("mmc4", path)
    assert e.value.kind == "shard_unreadable"
    assert shard_size("mmc4", path) == 0


@pytest.mark.parametrize("content", [b"", bytes(range(256)) * 12])
def test_a_corrupt_tar_is_named_in_one_line(tmp_path, content):
    from lcl_fast.data import DataError, build_train_loader

    from .fakes import FakeTokenizer

    opts = dict(batch_size=2, context_length=16, num_img_token=2, image_size=8, decoder="pil")
    bad = tmp_path / "shards" / "bad.tar"
    bad.parent.mkdir()
    bad.write_bytes(content)
    with pytest.raises(DataError) as e:
        build_train_loader("webdataset", str(bad), FakeTokenizer(), **opts)
    message = str(e.value)
    assert message.startswith(f"{bad}: cannot be read as a tar") and "\n" not in message
    # beside a good shard, it is skipped and counted
    write_pair_shards(tmp_path / "shards", [3])
    loader = build_train_loader("webdataset", str(tmp_path / "shards"), FakeTokenizer(), **opts)
    assert len(list(loader) + list(loader)) == 2  # 4 rows of 3 samples: every shard read
    assert list(loader.skip_counts) == ["shard_unreadable"]  # counted (once per data epoch)


def test_a_corrupt_jsonl_zip_is_named_in_one_line(tmp_path):
    from lcl_fast.data import DataError, build_train_loader

    from .fakes import FakeTokenizer

    (tmp_path / "data").mkdir()
    bad = tmp_path / "data" / "docs_shard_0_v2.jsonl.zip"
    bad.write_bytes(b"PK not really a zip")
    with pytest.raises(DataError, match=f"^{bad}: .*(zip|read)") as e:
        build_train_loader("mmc4", str(tmp_path), FakeTokenizer(), batch_size=2, context_length=16,
                           num_img_token=2, image_size=8, decoder="pil")
    assert "\n" not in str(e.value)
