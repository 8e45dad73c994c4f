"""torch.compile over LCL forward + LCLLoss: one graph (no break), no recompile per batch, eager's numbers.

Compiled with the ``aot_eager`` backend: it traces forward and backward with fake tensors (the
custom ops' fakes and autograd formulas included) at a fraction of inductor's compile time on
two cores; ``benchmarks/bench_train.py`` times the inductor build.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import lcl_fast
from lcl_fast.training.step import StepFunction, prepare_batch
from tests._compare import rel_err


def _golden_model(golden: dict, impl: str):
    torch.manual_seed(0)
    model = lcl_fast.create_model(golden["config"], impl=impl, fused_generation_loss=True)
    model.load_state_dict(golden["state_dict"])
    loss_fn = lcl_fast.LCLLoss(golden["generation_loss_weight"], golden["contrastive_loss_weight"],
                               local_loss=True, gather_with_grad=True, impl=impl)
    return model.float(), loss_fn


def _batches(golden: dict, picks: list[list[int]]) -> list[dict]:
    """Batches of the golden rows ``picks`` (with repeats): same row count, different pair/image/token counts."""
    text, images = golden["text_ids"], golden["images"].float()
    soi = golden["config"]["special_token_ids"]["<start_of_img>"]
    per_row = (text == soi).sum(1).tolist()
    starts = [sum(per_row[:i]) for i in range(len(per_row))]
    out = []
    for rows in picks:
        imgs = torch.cat([images[starts[r]:starts[r] + per_row[r]] for r in rows])
        out.append({"images": imgs, "text_ids": text[rows].clone(), "doc_ids": None, "position_ids": None})
    return out


def _losses_and_grads(step: StepFunction, model, batch: dict):
    model.zero_grad(set_to_none=True)
    contrastive, caption = step(batch)
    (contrastive + caption).backward()
    return contrastive.detach(), caption.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


CASES = {
    # paired rows: image-first rows have no context, so the pair count follows the pick
    # (rows 0 and 3 open with their image: 4, 5, 2, 3 and 6 pairs)
    "paired_a": [[0, 1, 2, 3, 4, 5], [0, 1, 1, 2, 2, 4], [0, 3, 3, 5, 0, 1], [0, 3, 5, 1, 2, 0], [1, 2, 4, 5, 5, 1]],
    # interleaved rows hold 2, 1 and 3 images: images, pairs and generation tokens all vary
    "interleaved_a": [[0, 1, 2], [2, 2, 1], [1, 1, 0], [0, 2, 0]],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_matches_eager_without_recompiles(golden_dir, case):
    golden = torch.load(golden_dir / f"{case}.pt")
    model, loss_fn = _golden_model(golden, "torch")
    batches = _batches(golden, CASES[case])
    targets = [prepare_batch(model, b) for b in batches]
    counts = {(t["images"].shape[0], t["pair_text_index"].shape[0], t["gen_index"].shape[0]) for t in targets}
    assert len(counts) == len(batches), f"the picks must give distinct counts, got {counts}"
    counter = CompileCounterWithBackend("aot_eager")
    compiled = StepFunction(model, loss_fn, compile=True, backend=counter, fullgraph=True)  # a break would raise
    eager = StepFunction(model, loss_fn)
    for batch in batches:
        got = _losses_and_grads(compiled, model, batch)
        want = _losses_and_grads(eager, model, batch)
        assert rel_err(got[0], want[0]) <= 1e-5 and rel_err(got[1], want[1]) <= 1e-5, (got[:2], want[:2])
        for name, g in got[2].items():
            assert rel_err(g, want[2][name]) <= 1e-4, name
    # one graph for every count (a per-batch recompile would give one per batch)
    assert counter.frame_count == 1, f"{counter.frame_count} compilations over {len(batches)} batches"


def test_compiled_triton_path_is_one_graph(golden_dir):
    """The Triton kernels (interpreter on the CPU) sit in the graph as custom ops: no break, eager's loss."""
    golden = torch.load(golden_dir / "paired_a.pt")
    model, loss_fn = _golden_model(golden, "triton")
    batch = _batches(golden, [[4, 5]])[0]  # two short rows with context: the interpreter is slow
    counter = CompileCounterWithBackend("aot_eager")
    compiled = StepFunction(model, loss_fn, compile=True, backend=counter, fullgraph=True)
    got = _losses_and_grads(compiled, model, batch)
    want = _losses_and_grads(StepFunction(model, loss_fn), model, batch)
    assert counter.frame_count == 1
    assert rel_err(got[0], want[0]) <= 1e-5 and rel_err(got[1], want[1]) <= 1e-5
    for name, g in got[2].items():
        assert rel_err(g, want[2][name]) <= 1e-4, name


def test_compiled_forward_rejects_nothing_eager_accepts_and_eager_keeps_errors(golden_dir):
    golden = torch.load(golden_dir / "paired_a.pt")
    model, loss_fn = _golden_model(golden, "torch")
    batch = _batches(golden, [[0, 1, 2, 3, 4, 5]])[0]
    batch["images"] = batch["images"][:5]  # one image short
    with pytest.raises(ValueError, match="img_placehold"):
        StepFunction(model, loss_fn, compile=True, backend="eager")(batch)  # checked eagerly, before the graph


def test_compiled_packed_rows_match_eager(golden_dir):
    """Packed rows (``doc_ids``): the torch path's per-document attention runs as one custom op."""
    golden = torch.load(golden_dir / "interleaved_a.pt")
    model, loss_fn = _golden_model(golden, "torch")
    batch = _batches(golden, [[1, 2]])[0]
    # two documents per row: the row's first 40 tokens and the rest, each with its own positions
    text = batch["text_ids"]
    doc_ids = torch.where(torch.arange(text.shape[1]) < 40, 0, 1).expand_as(text).clone()
    doc_ids[text == 0] = -1  # trailing padding
    batch["doc_ids"] = doc_ids
    batch["position_ids"] = torch.where(doc_ids == 1, torch.arange(text.shape[1]) - 40, torch.arange(text.shape[1]))
    batch["position_ids"] = batch["position_ids"].clamp_min(0) * (doc_ids >= 0)
    counter = CompileCounterWithBackend("aot_eager")
    got = _losses_and_grads(StepFunction(model, loss_fn, compile=True, backend=counter, fullgraph=True), model, batch)
    want = _losses_and_grads(StepFunction(model, loss_fn), model, batch)
    assert counter.frame_count == 1
    assert rel_err(got[0], want[0]) <= 1e-5 and rel_err(got[1], want[1]) <= 1e-5
    for name, g in got[2].items():
        assert rel_err(g, want[2][name]) <= 1e-4, name
