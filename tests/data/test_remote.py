"""Remote shards against a real S3 server (moto, started here) behind a fault-injecting proxy:
webdataset / MMC4 / parquet over s3:// and pipe:, faults, resume with the shuffle buffer,
the exactly-once audit over 2 ranks x 2 workers, clear errors at start."""

from __future__ import annotations

import json
import os
import socket
from collections import Counter
from pathlib import Path

import pytest

_NEEDS = "remote-data tests need moto[server] and s3fs: pip install -e '.[dev]' (or '.[s3]' and moto[server])"
pytest.importorskip("moto.server", reason=_NEEDS)
pytest.importorskip("s3fs", reason=_NEEDS)

from lcl_fast.data import build_train_loader  # noqa: E402
from lcl_fast.data import remote as R  # noqa: E402

from .fakes import FakeTokenizer, doc, image_bytes, pair_members, write_mmc4, write_tar  # noqa: E402
from .s3server import Fault, S3Server  # noqa: E402
from .test_loader import _same, _take  # noqa: E402

TOK = FakeTokenizer()
SMALL = dict(batch_size=2, context_length=16, num_img_token=2, image_size=8, decoder="pil")
SIZES = [5, 4, 6, 3, 5, 4, 4]  # shard 7 is listed but missing; shard 3 also holds one bad sample
PAIRS = "s3://bkt/pairs/shard-{000000..000007}.tar"
GOOD = sum(SIZES)


def _write_pairs(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, n in enumerate(SIZES):
        members = []
        for i in range(n):
            members += pair_members(f"s{s}_{i:03d}", f"caption {s} {i}", seed=100 * s + i)
            if s == 3 and i == 1:
                members += [("s3_bad.jpg", b"not an image"), ("s3_bad.txt", b"bad image")]
        paths.append(write_tar(folder / f"shard-{s:06d}.tar", members))
    return paths


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto + proxy, the standard AWS environment pointing at the proxy, and the test data
    uploaded (local copies under ``s3.local``)."""
    server = S3Server()
    local = tmp_path_factory.mktemp("s3data")
    client = server.client()
    client.create_bucket(Bucket="bkt")
    for path in _write_pairs(local / "pairs"):
        client.upload_file(str(path), "bkt", f"pairs/{path.name}")
    images = {f"i{k}.jpg": image_bytes(20, 18, seed=k) for k in range(12)}
    docs = [doc([f"doc {d} a", f"doc {d} b"], [(f"i{d % 12}.jpg", 1, 0.4)]) for d in range(10)]
    docs[4] = doc(["gone a", "gone b"], [("missing.jpg", 0, 0.5)])
    write_mmc4(local / "mmc4", [docs[:5], docs[5:]], images)
    for f in sorted((local / "mmc4").rglob("*")):
        if f.is_file():
            key = f.relative_to(local).as_posix()
            client.upload_file(str(f), "bkt", key)
            if key.startswith("mmc4/images/"):
                client.upload_file(str(f), "bkt", "imgs/" + f.name)
    server.local = local
    with server.environment():
        yield server


@pytest.fixture(autouse=True)
def small_io(monkeypatch, request):
    """Small range requests (so a shard takes several) and short backoff; faults cleared."""
    monkeypatch.setattr(R, "BLOCK_BYTES", 4096)
    monkeypatch.setattr(R, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(R, "BACKOFF_S", 0.01)
    if "s3" in request.fixturenames:
        request.getfixturevalue("s3").proxy.reset()


def _local_pairs(s3) -> str:
    return str(s3.local / "pairs" / "shard-{000000..000006}.tar")


# ----------------------------------------------------------------------------- sources


def test_remote_and_piped_tars_give_the_local_batches(s3):
    opts = dict(SMALL, shuffle=False, num_samples=GOOD, streams_per_rank=2)
    local = _take(build_train_loader("webdataset", _local_pairs(s3), TOK, **opts), 12)
    loader = build_train_loader("webdataset", PAIRS, TOK, **opts)
    _same(_take(loader, 12), local)
    assert loader.skip_counts == {"image_decode": 1, "shard_missing": 1}
    # streamed, never downloaded whole: several range requests per shard
    gets = [r for r in s3.proxy.requests if r.startswith("GET /bkt/pairs/shard-000002.tar")]
    assert len(gets) >= 3 and all("Range: bytes=" in r for r in gets)

    piped = "pipe:cat " + str(s3.local / "pairs" / "shard-{000000..000007}.tar")
    loader = build_train_loader("webdataset", piped, TOK, **opts)
    _same(_take(loader, 12), local)
    assert loader.skip_counts == {"image_decode": 1, "shard_unreadable": 1}  # cat fails on the missing one


def test_the_next_shard_is_fetched_while_the_current_one_is_read(s3):
    import time

    for kind, data, nxt, opts in [
        ("webdataset", PAIRS, "GET /bkt/pairs/shard-000001.tar", {}),
        ("mmc4", "s3://bkt/mmc4", "GET /bkt/mmc4/data/docs_shard_1_v2.jsonl.zip", {"context_length": 30}),
    ]:
        s3.proxy.reset()
        loader = build_train_loader(kind, data, TOK, **{**SMALL, **opts}, shuffle=False, num_samples=10)
        _take(loader, 1)  # two samples of the first shard
        deadline = time.monotonic() + 10
        while not any(r.startswith(nxt) for r in s3.proxy.requests) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any(r.startswith(nxt) for r in s3.proxy.requests), kind


def test_eval_pairs_from_a_bucket(s3):
    from lcl_fast.data import build_eval_pairs

    local = build_eval_pairs("webdataset", _local_pairs(s3), image_size=8, num_pairs=9, decoder="pil")
    remote = build_eval_pairs("webdataset", PAIRS, image_size=8, num_pairs=9, decoder="pil")
    assert remote[1] == local[1] and len(local[1]) == 9
    assert (remote[0] == local[0]).all()


def test_cache_dir_copies_shards_whole_then_reads_them_like_local_ones(s3, tmp_path):
    opts = dict(SMALL, seed=5, num_samples=GOOD)
    local = _take(build_train_loader("webdataset", _local_pairs(s3), TOK, **opts), 6)
    pattern = "s3://bkt/pairs/shard-{000000..000006}.tar"
    loader = build_train_loader("webdataset", pattern, TOK, **opts, shard_cache=str(tmp_path / "c"))
    _same(_take(loader, 6), local)
    assert len(list((tmp_path / "c").rglob("*.tar"))) >= 2


@pytest.mark.parametrize("images", [None, "s3://bkt/imgs"])
def test_mmc4_from_a_bucket(s3, images):
    opts = dict(SMALL, context_length=30, seed=2, streams_per_rank=2, num_samples=10)
    local = build_train_loader("mmc4", str(s3.local / "mmc4"), TOK, **opts)
    loader = build_train_loader("mmc4", "s3://bkt/mmc4", TOK, **opts, image_root=images)
    _same(_take(loader, 6), _take(local, 6))
    assert loader.skip_counts == local.skip_counts and "image_missing" in local.skip_counts


def test_parquet_from_a_bucket(s3, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = {
        "texts": [[f"row {r}", None] for r in range(6)] + [["side file", None]],
        "images": [[None, {"bytes": image_bytes(seed=r), "path": None}] for r in range(6)]
        + [[None, {"bytes": None, "path": "side.jpg"}]],  # a file beside the parquet
    }
    pq.write_table(pa.table(rows), tmp_path / "s.parquet", row_group_size=3)
    (tmp_path / "side.jpg").write_bytes(image_bytes(seed=9))
    for name in ("s.parquet", "side.jpg"):
        s3.client().upload_file(str(tmp_path / name), "bkt", f"obelics/{name}")
    opts = dict(SMALL, batch_size=1, context_length=20, seed=4, num_samples=7)
    local = build_train_loader("obelics", str(tmp_path / "s.parquet"), TOK, **opts)
    loader = build_train_loader("obelics", "s3://bkt/obelics/s.parquet", TOK, **opts)
    _same(_take(loader, 9), _take(local, 9))
    assert loader.skip_counts == {}


# ----------------------------------------------------------------------------- faults


def test_failed_reads_are_retried_where_they_stopped(s3):
    opts = dict(SMALL, shuffle=False, num_samples=GOOD)
    clean = _take(build_train_loader("webdataset", PAIRS, TOK, **opts), 10)
    s3.proxy.reset()
    s3.proxy.faults = [
        Fault("GET /bkt/pairs/shard-000000.tar", "503"),
        # the second range request (mid-shard) cut 5 times: s3fs's own retries give up, then ours
        Fault("GET /bkt/pairs/shard-000001.tar", "drop", after=3000, skip=1, times=5),
    ]
    loader = build_train_loader("webdataset", PAIRS, TOK, **opts)
    _same(_take(loader, 10), clean)
    assert [h.split()[0] for h in s3.proxy.hits] == ["503"] + ["drop"] * 5
    dropped = s3.proxy.hits[1].split(" ", 1)[1]
    again = [r for r in s3.proxy.requests if r == dropped]
    assert len(again) == 6 and "bytes=0-" not in dropped  # the same range asked again, not the shard
    assert loader.skip_counts == {"image_decode": 1}


def test_a_failed_pipe_is_run_again_and_the_bytes_read_are_dropped(s3, tmp_path):
    shard = s3.local / "pairs" / "shard-000002.tar"
    script = tmp_path / "flaky.sh"  # the first run dies after 5000 bytes, as a broken download would
    script.write_text('if [ ! -e "$1" ]; then touch "$1"; head -c 5000 "$2"; exit 1; fi; cat "$2"\n')
    opts = dict(SMALL, batch_size=1, shuffle=False, num_samples=SIZES[2], steps_per_epoch=SIZES[2])
    piped = build_train_loader("webdataset", f"pipe:sh {script} {tmp_path / 'ran'} {shard}", TOK, **opts)
    _same(_take(piped, SIZES[2]), _take(build_train_loader("webdataset", str(shard), TOK, **opts), SIZES[2]))
    assert (tmp_path / "ran").exists() and piped.skip_counts == {}


def test_a_shard_failing_every_retry_is_skipped_and_counted(s3):
    s3.proxy.faults = [Fault("GET /bkt/pairs/shard-000002.tar", "503", times=100)]
    opts = dict(SMALL, shuffle=False, num_samples=GOOD)
    loader = build_train_loader("webdataset", PAIRS, TOK, **opts)
    _take(loader, 12)
    assert loader.skip_counts["shard_unreadable"] == 1
    assert sum(h.startswith("503") for h in s3.proxy.hits) == R.RETRIES + 1


def test_bad_credentials_or_no_endpoint_stop_before_training(s3, monkeypatch):
    s3.proxy.faults = [Fault("/bkt/", "403", header="Credential=BADKEY", times=100)]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "BADKEY")
    with pytest.raises(RuntimeError, match=r"s3://bkt/pairs/shard-000000.tar.*AWS_ACCESS_KEY_ID"):
        build_train_loader("webdataset", PAIRS, TOK, **SMALL, num_samples=GOOD)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(RuntimeError, match=rf"s3://bkt/pairs/shard-000000.tar.*127.0.0.1:{port}"):
        build_train_loader("webdataset", PAIRS, TOK, **SMALL, num_samples=GOOD)


def test_remote_shards_need_a_sample_count(s3):
    with pytest.raises(ValueError, match="num_samples"):
        build_train_loader("webdataset", PAIRS, TOK, **SMALL)
    sizes = {f"shard-{s:06d}.tar": n for s, n in enumerate(SIZES + [0])}
    s3.client().put_object(Bucket="bkt", Key="pairs/sizes.json", Body=json.dumps(sizes).encode())
    try:
        assert build_train_loader("webdataset", PAIRS, TOK, **SMALL).num_samples == GOOD
    finally:
        s3.client().delete_object(Bucket="bkt", Key="pairs/sizes.json")


# ----------------------------------------------------------------------------- shuffle, resume, audit


def test_resume_with_the_shuffle_buffer_is_exact(s3):
    opts = dict(SMALL, seed=3, num_samples=GOOD, streams_per_rank=2, shuffle_buffer=4)
    whole = build_train_loader("webdataset", PAIRS, TOK, **opts)
    reference = _take(whole, 14)
    first = build_train_loader("webdataset", PAIRS, TOK, **opts)
    part = _take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))
    assert all(len(s["buffer"]) >= 3 for s in state["streams"])  # the buffer's samples are in the state
    assert any(s["byte"] > 0 for s in state["streams"])  # and a stream stopped mid-shard
    resumed = build_train_loader("webdataset", PAIRS, TOK, **opts)
    resumed.load_state_dict(state)
    s3.proxy.faults = [Fault("GET /bkt/pairs/", "drop", after=2500, skip=3)]  # and a fault after resuming
    _same(part + _take(resumed, 9), reference)
    assert s3.proxy.hits
    # the buffer shuffles across shards, deterministically per seed
    unbuffered = _take(build_train_loader("webdataset", PAIRS, TOK, **{**opts, "shuffle_buffer": 0}), 14)
    assert any(not (a["text_ids"] == b["text_ids"]).all() for a, b in zip(reference, unbuffered))


def test_resampled_draws_shards_with_replacement(s3):
    from lcl_fast.data.streams import SampleStream, StreamConfig

    cfg = StreamConfig("webdataset", [f"s{i}" for i in range(8)], None, TOK, 1, 16, 2, 8,
                       world_size=2, streams_per_rank=2, resampled=True, seed=1)
    plans = [SampleStream(cfg, s).plan(e) for e in range(3) for s in range(4)]
    assert all(len(p) == 2 for p in plans)
    assert any(len({x for p in plans[4 * e : 4 * e + 4] for x in p}) < 8 for e in range(3))  # repeats
    assert plans == [SampleStream(cfg, s).plan(e) for e in range(3) for s in range(4)]
    loader = build_train_loader("webdataset", PAIRS, TOK, **SMALL, num_samples=GOOD, resampled=True, seed=1)
    assert len(_take(loader, 8)) == 8


def test_one_epoch_over_2_ranks_x_2_workers_reads_each_sample_once(s3, tmp_path):
    s3.proxy.faults = [
        Fault("GET /bkt/pairs/shard-000001.tar", "503"),
        Fault("GET /bkt/pairs/shard-000004.tar", "drop", after=3000, skip=1),
    ]
    audit = tmp_path / "audit.tsv"
    skips = Counter()
    for rank in range(2):
        loader = build_train_loader(
            "webdataset", PAIRS, TOK, **{**SMALL, "batch_size": 1}, rank=rank, world_size=2, workers=2,
            num_samples=GOOD, shuffle_buffer=3, seed=1, data_audit=str(audit), steps_per_epoch=60,
        )
        _take(loader, 60)  # 30 samples per stream: past the end of data epoch 0 on every stream
        skips.update(loader.skip_counts)
    lines = [x.split("\t") for r in range(2) for x in Path(f"{audit}.rank{r}").read_text().splitlines()]
    assert {(rank, worker) for rank, worker, *_ in lines} == {(r, w) for r in "01" for w in "01"}
    first_epoch = [key for _, _, epoch, _, key in lines if epoch == "0"]
    expected = [f"s{s}_{i:03d}" for s, n in enumerate(SIZES) for i in range(n)]
    assert sorted(first_epoch) == sorted(expected)  # each exactly once; the bad one left out
    assert skips["image_decode"] >= 1 and skips["shard_missing"] >= 1
    assert sorted(h.split()[0] for h in s3.proxy.hits) == ["503", "drop"]


def test_dali_gets_the_remote_bytes(s3):
    pytest.importorskip("nvidia.dali")
    opts = dict(SMALL, shuffle=False, num_samples=GOOD)
    dali = build_train_loader("webdataset", PAIRS, TOK, **{**opts, "decoder": "dali"})
    pil = build_train_loader("webdataset", PAIRS, TOK, **opts)
    for a, b in zip(_take(dali, 3), _take(pil, 3)):
        assert (a["text_ids"] == b["text_ids"]).all() and a["images"].shape == b["images"].shape


def test_fewer_remote_shards_than_streams_split_by_sample(s3):
    from lcl_fast.data.streaming import TarStream
    from lcl_fast.data.streams import StreamConfig

    shards = [f"s3://bkt/pairs/shard-{s:06d}.tar" for s in (0, 1)]
    cfg = StreamConfig("webdataset", shards, SIZES[:2], TOK, 1, 16, 2, 8, world_size=2, streams_per_rank=2)
    seen = []
    for sid in range(4):
        stream = TarStream(cfg, sid)
        while True:
            raw, _, _ = stream.next()
            if stream.data_epoch:
                break
            seen.append(raw["key"])
        stream.close()
    assert sorted(seen) == sorted(f"s{s}_{i:03d}" for s in (0, 1) for i in range(SIZES[s]))


def test_training_on_remote_data_resumes_exactly_with_the_buffer_on(s3, tmp_path, monkeypatch):
    """The trainer's exact resume (SIGTERM at step 2 of 4, then --resume latest; a dropped
    connection after resuming): steps 3-4 equal the uninterrupted run's, and so do the keys
    --data-audit wrote. Also: the data flags reach the loader."""
    import signal

    import numpy as np
    import torch

    from lcl_fast.train import main
    from lcl_fast.training import loop

    logs = tmp_path / "logs"
    args = ["--batch-size", "2", "--no-progress", "--report-to", "none", "--val-pairs", "0", "--seed", "7"]
    args += ["--log-every-n-steps", "1", "--save-frequency", "0", "--logs", str(logs), "--steps", "4"]
    args += ["--save-every-n-steps", "2", "--dataset-type", "webdataset", "--train-data", PAIRS]
    args += ["--train-num-samples", str(GOOD), "--shuffle-buffer", "6", "--dataset-resampled"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*args, "--name", "whole", "--data-audit", str(tmp_path / "whole.tsv")]) == 0
        real_step, calls = loop.Trainer.train_step, []

        def step_then_signal(self, batches):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return real_step(self, batches)

        monkeypatch.setattr(loop.Trainer, "train_step", step_then_signal)
        assert main([*args, "--name", "cut", "--data-audit", str(tmp_path / "cut.tsv")]) == 0
        monkeypatch.setattr(loop.Trainer, "train_step", real_step)
        s3.proxy.faults = [Fault("GET /bkt/pairs/", "drop", after=2500, skip=2)]
        assert main([*args, "--name", "cut", "--resume", "latest", "--data-audit", str(tmp_path / "cut.tsv")]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = {
        name: [json.loads(x) for x in (logs / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("whole", "cut")
    }
    assert [r["step"] for r in rows["cut"]] == [r["step"] for r in rows["whole"]] == list(range(1, 5))
    np.testing.assert_allclose([r["loss"] for r in rows["cut"]], [r["loss"] for r in rows["whole"]], rtol=1e-6)
    assert s3.proxy.hits
    audit = (tmp_path / "whole.tsv").read_text().splitlines()
    assert len(audit) == 8 and (tmp_path / "cut.tsv").read_text().splitlines() == audit
