"""Flags: open_clip's names parse into TrainConfig; bad ones fail before any work, naming the flag."""

from __future__ import annotations

import pytest

from lcl_fast.train import main
from lcl_fast.training.config import TrainConfig, parse_config


def test_open_clip_flags_parse(tmp_path):
    shard = tmp_path / "shard-000000.tar"
    shard.write_bytes(b"")
    cfg = parse_config(
        [
            "--model",
            "LCL_tiny",
            "--train-data",
            str(shard),
            "--dataset-type",
            "webdataset",
            "--batch-size",
            "7",
            "--epochs",
            "3",
            "--lr",
            "3e-4",
            "--wd",
            "0.1",
            "--beta1",
            "0.8",
            "--beta2",
            "0.95",
            "--eps",
            "1e-8",
            "--warmup",
            "17",
            "--precision",
            "amp_bf16",
            "--grad-checkpointing",
            "--accum-freq",
            "2",
            "--local-loss",
            "--gather-with-grad",
            "--lcl-generation-loss-weight",
            "0.5",
            "--lcl-contrastive-loss-weight",
            "0.2",
            "--interleaved-context-length",
            "48",
            "--num-img-token",
            "16",
            "--img-first-prob",
            "0.25",
            "--pack",
            "--save-frequency",
            "2",
            "--logs",
            str(tmp_path),
            "--name",
            "x",
            "--log-every-n-steps",
            "5",
            "--report-to",
            "tensorboard",
            "--seed",
            "3",
            "--torchcompile",
            "--zeroshot-frequency",
            "1",
            "--imagenet-val",
            str(tmp_path),
            "--workers",
            "2",
            "--fsdp",
            "--grad-clip-norm",
            "1.0",
        ]
    )
    assert (
        cfg.batch_size == 7 and cfg.epochs == 3 and cfg.lr == 3e-4 and cfg.beta2 == 0.95 and cfg.eps == 1e-8
    )
    assert cfg.precision == "amp_bf16" and cfg.grad_checkpointing and cfg.accum_freq == 2 and cfg.pack
    assert cfg.lcl_contrastive_loss_weight == 0.2 and cfg.interleaved_context_length == 48
    assert cfg.num_img_token == 16 and cfg.torchcompile and cfg.fsdp and cfg.grad_clip_norm == 1.0
    # The published recipe's loss settings are the defaults; they can be switched off.
    assert TrainConfig().local_loss and TrainConfig().gather_with_grad
    assert not parse_config(["--no-gather-with-grad"]).gather_with_grad


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--batch-size", "0"], "--batch-size must be > 0, got 0"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--beta2", "1.0"], "--beta2 must lie in [0, 1)"),
        (["--img-first-prob", "1.5"], "--img-first-prob"),
        (["--epochs", "2", "--steps", "9"], "--epochs (2) or --steps (9), not both"),
        (["--model", "LCL_ViT-Z-99"], "--model: unknown model 'LCL_ViT-Z-99'"),
        (["--num-img-token", "49"], "--num-img-token 49 does not fit --model LCL_tiny"),
        (["--interleaved-context-length", "4096"], "--interleaved-context-length 4096 exceeds"),
        (["--dataset-type", "webdataset"], "--dataset-type webdataset needs --train-data"),
        (
            ["--dataset-type", "webdataset", "--train-data", "/nonexistent/shards/{000..009}.tar"],
            "/nonexistent/shards/000.tar does not exist (10 of 10 shards missing)",
        ),
        (["--dataset-type", "mmc4", "--train-data", "/nonexistent/mmc4"], "--train-data"),
        (["--train-data", "something"], "--train-data 'something' with --dataset-type synthetic"),
        (["--resume", "/nonexistent/step_1.pt"], "--resume: /nonexistent/step_1.pt is not a file"),
        (["--resume", "latest"], "--resume latest needs --name"),
        (["--imagenet-val", "/nonexistent/val"], "--imagenet-val: /nonexistent/val is not a folder"),
        (["--report-to", "wandb"], "--report-to 'wandb'"),
        (["--optimizer", "apex_fused_adam"], "NVIDIA apex"),
        (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
        (["--dataset-type", "csv"], "argument --dataset-type: invalid choice: 'csv'"),
        (["--batchsize", "8"], "unrecognized arguments: --batchsize"),
        (["--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
        (["--shuffle-buffer", "-1"], "--shuffle-buffer must be >= 0"),
        (["--train-num-samples", "0"], "--train-num-samples must be > 0"),
    ],
)
def test_bad_flags_fail_before_any_work(argv, needle, tmp_path, capsys):
    logs = tmp_path / "logs"
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--logs", str(logs)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert not logs.exists()  # nothing was built, no run folder made


def test_existing_run_folder_is_not_overwritten(train_env, capsys):
    (train_env / "taken" / "checkpoints").mkdir(parents=True)
    (train_env / "taken" / "checkpoints" / "step_00000001.pt").write_bytes(b"x")
    assert main(["--logs", str(train_env), "--name", "taken", "--steps", "1"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
