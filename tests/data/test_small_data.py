"""Data smaller than the shuffle buffer (the default 1000) trains, locally and from S3, and resumes
exactly: the buffer holds a stream's data epoch whole, and hands it out before the next one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lcl_fast.data import build_train_loader

from .fakes import FakeTokenizer, doc, image_bytes, pair_members, write_mmc4, write_tar
from .test_loader import _same, _take

TOK = FakeTokenizer()
# the trainer's default buffer; a batch of 4 rows
OPTS = dict(batch_size=4, context_length=30, num_img_token=2, image_size=8, decoder="pil", shuffle_buffer=1000)
DOCS = (1, 3, 13)
PAIRS = 3  # fewer than the batch


def _mmc4(root: Path, n: int) -> Path:
    """``n`` good documents and one malformed line (a planted fault)."""
    images = {f"i{k}.jpg": image_bytes(20, 18, seed=k) for k in range(4)}
    docs = [doc([f"doc {d} a", f"doc {d} b"], [(f"i{d % 4}.jpg", 1, 0.4)]) for d in range(n)]
    return write_mmc4(root, [docs[: n // 2] + ["{not json"] + docs[n // 2 :]], images)


def _pairs(folder: Path) -> Path:
    members = [m for i in range(PAIRS) for m in pair_members(f"p{i}", f"caption {i}", seed=i)]
    members += [("bad.jpg", b"not an image"), ("bad.txt", b"bad image")]  # a planted fault
    folder.mkdir(parents=True)
    write_tar(folder / "shard-000000.tar", members)
    return folder


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The small data sets, on disk and in a bucket of a local S3 server (moto)."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    from .s3server import S3Server

    local = tmp_path_factory.mktemp("small")
    for n in DOCS:
        _mmc4(local / f"mmc4_{n}", n)
    _pairs(local / "pairs")
    (local / "corrupt").mkdir()
    (local / "corrupt" / "shard-000000.tar").write_bytes(bytes(range(256)) * 12)
    server = S3Server()
    client = server.client()
    client.create_bucket(Bucket="bkt")
    for f in sorted(local.rglob("*")):
        if f.is_file():
            client.upload_file(str(f), "bkt", "small/" + f.relative_to(local).as_posix())
    with server.environment():
        yield local


def _where(small, place: str, name: str) -> str:
    return str(small / name) if place == "local" else f"s3://bkt/small/{name}"


def _audit(path: Path) -> list[tuple[int, str]]:
    """(data epoch, key) of each consumed sample."""
    return [(int(x.split("\t")[2]), x.split("\t")[4]) for x in path.read_text().splitlines()]


@pytest.mark.parametrize("place", ["local", "s3"])
@pytest.mark.parametrize("n", DOCS)
def test_a_few_documents_train_with_the_default_buffer(small, tmp_path, place, n):
    audit = tmp_path / "audit.tsv"
    count = {} if place == "local" else {"num_samples": n + 1}
    loader = build_train_loader("mmc4", _where(small, place, f"mmc4_{n}"), TOK, **OPTS, **count,
                                data_audit=str(audit))
    batches = _take(loader, 4)  # 16 rows: several data epochs of 1 or 3 documents
    assert all(b["text_ids"].shape[0] == 4 for b in batches)
    seen = _audit(audit)
    assert [e for e, _ in seen] == sorted(e for e, _ in seen)  # data epochs handed out in order
    for epoch in {e for e, _ in seen[:-n]}:  # each whole epoch: every document exactly once
        assert sorted(k for e, k in seen if e == epoch) == sorted(str(d) for d in range(n + 1) if d != n // 2)
    assert loader.skip_counts["jsonl_line"] >= 1  # the planted fault is counted


@pytest.mark.parametrize("place", ["local", "s3"])
def test_fewer_pairs_than_the_batch_train_with_the_default_buffer(small, place):
    count = {} if place == "local" else {"num_samples": PAIRS + 1}
    loader = build_train_loader("webdataset", _where(small, place, "pairs"), TOK, **OPTS, **count)
    batches = _take(loader, 3)
    assert all(b["text_ids"].shape[0] == 4 for b in batches)
    assert loader.skip_counts["image_decode"] >= 1


@pytest.mark.parametrize("kind, name", [("mmc4", "mmc4_13"), ("webdataset", "pairs")])
@pytest.mark.parametrize("place", ["local", "s3"])
def test_small_data_resumes_exactly_with_the_default_buffer(small, place, kind, name):
    opts = dict(OPTS, seed=5, **({} if place == "local" else {"num_samples": 14 if kind == "mmc4" else 4}))
    data = _where(small, place, name)
    reference = _take(build_train_loader(kind, data, TOK, **opts), 7)
    first = build_train_loader(kind, data, TOK, **opts)
    part = _take(first, 3)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["streams"][0]["buffer"]  # stopped with samples held
    resumed = build_train_loader(kind, data, TOK, **opts)
    resumed.load_state_dict(state)
    _same(part + _take(resumed, 4), reference)


def test_remote_shards_need_no_count_when_the_run_length_is_fixed(small):
    data = _where(small, "s3", "mmc4_13")  # no sizes.json, no num_samples
    with pytest.raises(ValueError, match="--steps"):
        build_train_loader("mmc4", data, TOK, **OPTS)
    loader = build_train_loader("mmc4", data, TOK, **OPTS, run_steps=5)
    assert len(loader) == 5  # the run is one epoch
    assert len(list(loader)) == 5


def _listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.mark.parametrize("place", ["local", "s3"])
def test_the_trainer_runs_13_documents_with_the_default_flags(small, tmp_path, place, data_cache):
    """The trainer's defaults (a 1000-sample buffer, batch 32) on a 13-document corpus with a bad
    line; from S3 without --train-num-samples (--steps fixes the length). Nothing is written
    beside the shards: their index lives in the cache folder."""
    import torch

    from lcl_fast.train import main

    before = _listing(small / "mmc4_13")
    args = ["--dataset-type", "mmc4", "--train-data", _where(small, place, "mmc4_13"), "--steps", "2"]
    args += ["--logs", str(tmp_path), "--name", "run", "--no-progress", "--report-to", "none", "--val-pairs", "0"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "jsonl_line" in json.dumps(summary)  # the planted fault, counted
    assert _listing(small / "mmc4_13") == before
    if place == "local":
        assert list((data_cache / "index").glob("docs_shard_0_v2.jsonl.zip.*.lclidx"))


@pytest.mark.parametrize("place", ["local", "s3"])
def test_a_corrupt_tar_is_named(small, place):
    from lcl_fast.data import DataError

    data = _where(small, place, "corrupt")
    with pytest.raises(DataError, match=f"{data}/shard-000000.tar") as e:
        loader = build_train_loader("webdataset", data, TOK, **OPTS, run_steps=2)  # streamed: found reading
        _take(loader, 1)
    assert "\n" not in str(e.value)
