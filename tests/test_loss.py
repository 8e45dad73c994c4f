"""LCLLoss: the reference's interface and results, on one process and on two gloo ranks with ragged counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lcl_fast
from tests._compare import assert_close
from tests._dist import spawn_gloo

CPU_IMPLS = ("reference", "torch", "triton")  # triton runs under TRITON_INTERPRET=1 here (tests/conftest.py)


def _rank_main(rank: int, world: int, golden_path: str, out_dir: str) -> None:
    mine = torch.load(golden_path)["ranks"][rank]
    gen = torch.Generator().manual_seed(rank)
    logits = torch.randn(6, 11, generator=gen)
    labels = torch.tensor([3, 0, 5, 10, 0, 1])  # 0 is the pad id: ignored
    results = {}
    for impl in CPU_IMPLS:
        loss_fn = lcl_fast.LCLLoss(generation_loss_weight=0.5, contrastive_loss_weight=1.0, local_loss=True,
                                   gather_with_grad=True, rank=rank, world_size=world, impl=impl)
        image = mine["image_features"].clone().requires_grad_()
        text = mine["text_features"].clone().requires_grad_()
        out = loss_fn(image, text, logits, labels, mine["logit_scale"], output_dict=True)
        (out["contrastive_loss"] + out["caption_loss"]).backward()
        results[impl] = {k: v.detach() for k, v in out.items()} | {"image_grad": image.grad, "text_grad": text.grad}
    results["expected_caption"] = 0.5 * F.cross_entropy(logits, labels, ignore_index=0)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def test_two_ranks_match_reference_golden(tmp_path, golden_dir):
    golden = torch.load(golden_dir / "distributed_a.pt")
    spawn_gloo(_rank_main, golden["world_size"], str(golden_dir / "distributed_a.pt"), str(tmp_path))
    for rank, want in enumerate(golden["ranks"]):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for impl in CPU_IMPLS:
            tag = f"rank {rank} impl={impl}"
            assert_close(got[impl]["contrastive_loss"], want["contrastive_loss"], rtol=1e-5, atol=0, name=tag)
            assert_close(got[impl]["caption_loss"], got["expected_caption"], rtol=1e-6, atol=0, name=tag)
            for name in ("image_grad", "text_grad"):
                scale = float(want[name].abs().max())
                assert_close(got[impl][name], want[name], rtol=1e-4, atol=1e-5 * scale, name=f"{tag} {name}")


def test_single_process_weights_and_zero_contrastive_weight():
    gen = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(4, 8, generator=gen), dim=-1)
    text = F.normalize(torch.randn(4, 8, generator=gen), dim=-1)
    logits, labels = torch.randn(5, 7, generator=gen), torch.tensor([1, 2, 0, 6, 3])
    scale = torch.tensor(10.0)
    y = torch.arange(4)
    expected = (F.cross_entropy(scale * image @ text.T, y) + F.cross_entropy(scale * text @ image.T, y)) / 2
    for impl in CPU_IMPLS:
        c, g = lcl_fast.LCLLoss(2.0, 0.25, impl=impl)(image, text, logits, labels, scale)
        assert_close(c, 0.25 * expected, rtol=1e-6, atol=0, name=f"contrastive {impl}")
        assert_close(g, 2.0 * F.cross_entropy(logits, labels, ignore_index=0), rtol=1e-6, atol=0, name="caption")
    c, _ = lcl_fast.LCLLoss(1.0, 0.0)(image, text, logits, labels, scale)
    assert c.item() == 0  # the reference skips the contrastive loss when its weight is 0


def test_all_labels_ignored_gives_zero_not_nan():
    logits = torch.randn(3, 5, requires_grad=True)
    labels = torch.zeros(3, dtype=torch.long)
    _, g = lcl_fast.LCLLoss(1.0, 0.0)(torch.zeros(0, 4), torch.zeros(0, 4), logits, labels, 1.0)
    g.backward()
    assert g.item() == 0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_bad_loss_arguments():
    with pytest.raises(ValueError, match="horovod"):
        lcl_fast.LCLLoss(1.0, 0.1, use_horovod=True)
    with pytest.raises(ValueError, match="impl must be one of"):
        lcl_fast.LCLLoss(1.0, 0.1, impl="cuda")
    with pytest.raises(ValueError, match="either logits or"):
        lcl_fast.LCLLoss(1.0, 0.0)(torch.zeros(0, 4), torch.zeros(0, 4), None, torch.zeros(3, dtype=torch.long), 1.0)
