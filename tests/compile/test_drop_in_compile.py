"""``torch.compile(model)`` as open_clip's trainer uses it: ``model(images, text)``, no loader extras.

Without the loader's targets the forward selects the pairs and the generation tokens itself, and
those selections (``nonzero``) have data-dependent shapes. They run eagerly, in one helper, so the
compiled forward breaks once there instead of at each selection; LCLLoss compiles whole.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from tests._compare import rel_err
from tests.compile.test_compiled_step import CASES, _batches, _golden_model


def _breaks(fn, *args, **kwargs) -> tuple[int, list[str]]:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args, **kwargs)
    return explained.graph_break_count, [r.reason.split("\n")[0] for r in explained.break_reasons]


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_open_clip_style_compile_breaks_at_most_once(golden_dir, impl):
    golden = torch.load(golden_dir / "paired_a.pt")
    model, loss_fn = _golden_model(golden, impl)
    batch = _batches(golden, [[4, 5]])[0]  # two short rows with context: the interpreter is slow
    model_breaks, model_reasons = _breaks(model, batch["images"], batch["text_ids"])
    out = model(batch["images"], batch["text_ids"])
    loss_breaks, loss_reasons = _breaks(loss_fn, **out, output_dict=True)
    assert model_breaks + loss_breaks <= 1, model_reasons + loss_reasons


def test_open_clip_style_compiled_model_matches_eager_without_a_compile_per_batch(golden_dir):
    golden = torch.load(golden_dir / "interleaved_a.pt")
    model, loss_fn = _golden_model(golden, "torch")
    batches = _batches(golden, CASES["interleaved_a"])  # images, pairs and generation tokens all vary
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)

    def run(fn, batch):
        model.zero_grad(set_to_none=True)
        losses = loss_fn(**fn(batch["images"], batch["text_ids"]), output_dict=True)
        (losses["contrastive_loss"] + losses["caption_loss"]).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        return losses["contrastive_loss"].detach(), losses["caption_loss"].detach(), grads

    for batch in batches:
        got, want = run(compiled, batch), run(model, batch)
        assert rel_err(got[0], want[0]) <= 1e-5 and rel_err(got[1], want[1]) <= 1e-5, (got[:2], want[:2])
        for name, g in got[2].items():
            assert rel_err(g, want[2][name]) <= 1e-4, name
    # two graphs (before and after the break), each compiled again at most once when a count first varies
    assert counter.frame_count <= 4, f"{counter.frame_count} compilations over {len(batches)} batches"
