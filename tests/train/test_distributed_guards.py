"""Distributed set-up guards: apex with FSDP2 and more ranks than GPUs are refused in one line; FSDP2's
mixed-precision policy follows ``--precision``."""

from __future__ import annotations

import pytest
import torch

import lcl_fast.train as train
from lcl_fast.factory import create_model, get_model_config
from lcl_fast.training import distributed as D
from lcl_fast.training.config import ConfigError


def test_apex_with_fsdp_is_refused_in_one_line(tmp_path, capsys):
    logs = tmp_path / "logs"
    with pytest.raises(SystemExit) as exc:
        train.main(["--fsdp", "--optimizer", "apex_fused_adam", "--logs", str(logs)])
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # argparse's usage may come first
    assert "error: --optimizer apex_fused_adam with --fsdp:" in last and "DTensor" in last
    assert not logs.exists()


def _fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_more_ranks_than_gpus_per_node_is_refused(monkeypatch, tmp_path, capsys):
    _fake_gpus(monkeypatch, 1)
    # rank 1 of 2 on a node that shows one GPU: before any process group or device is touched
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    assert train.main(["--steps", "1", "--logs", str(tmp_path / "logs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "lcl_fast.train: error: 2 ranks on this node but 1 visible CUDA device(s): start at most 1 per node "
        "(torchrun --nproc_per_node) or use --device cpu"
    )
    # rank 0 of the same two also refuses (no rank goes on to wait for the other in a collective)
    with pytest.raises(ConfigError, match="2 ranks on this node"):
        D.pick_device("auto", 0, 2)
    with pytest.raises(ConfigError, match="2 ranks on this node"):
        D.pick_device("cuda", 1)  # LOCAL_WORLD_SIZE unknown: the rank itself says so


def test_one_gpu_per_rank(monkeypatch):
    _fake_gpus(monkeypatch, 2)
    assert D.pick_device("auto", 1, 2) == torch.device("cuda", 1)
    assert D.pick_device("cuda", 0, 2) == torch.device("cuda", 0)
    assert D.pick_device("cpu", 1, 8) == torch.device("cpu")  # --device cpu: any number of ranks


@pytest.mark.parametrize("precision", ["amp_bf16", "amp", "fp32"])
def test_fsdp_mixed_precision_follows_precision(monkeypatch, precision):
    calls = []
    monkeypatch.setattr("torch.distributed.device_mesh.init_device_mesh", lambda *a, **k: "mesh")
    monkeypatch.setattr("torch.distributed.fsdp.fully_shard", lambda module, **kw: calls.append((module, kw)))
    model = create_model(get_model_config("LCL_tiny"))
    D.wrap_model(model, D.DistEnv(world_size=2), fsdp=True, precision=precision)
    blocks = [b for t in (model.visual, model.text) for b in t.transformer.resblocks]
    assert [m for m, _ in calls] == [*blocks, model]  # every block, then the root
    policies = [kw.get("mp_policy") for _, kw in calls]
    if precision == "fp32":
        assert policies == [None] * len(calls)  # no policy: all-gathers and reductions in fp32
        return
    dtype = torch.bfloat16 if precision == "amp_bf16" else torch.float16
    for policy in policies:
        assert (policy.param_dtype, policy.reduce_dtype) == (dtype, torch.float32)


class _Stop(Exception):
    pass


def test_trainer_hands_the_resolved_precision_to_fsdp(monkeypatch, train_env):
    seen = {}

    def wrap(model, env, **kwargs):
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(D, "wrap_model", wrap)
    with pytest.raises(_Stop):
        train.main(["--fsdp", "--precision", "amp_bf16", "--steps", "1", "--val-pairs", "0", "--logs", str(train_env)])
    assert seen == {"fsdp": True, "precision": "amp_bf16"}
