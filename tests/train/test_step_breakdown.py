"""``python -m benchmarks.step_breakdown``: real trainer steps, the LM-head op timed in place."""

from __future__ import annotations

from benchmarks import step_breakdown


def test_step_breakdown_times_the_op_inside_the_step(train_env):
    result = step_breakdown.main(["--steps", "2", "--warmup", "1", "--", "--batch-size", "4", "--seed", "3"])
    # the op's forward call and backward node were timed (0 if the patch missed the loss's call)
    assert 0 < result["op_ms"] < result["eager_ms"]
    kinds = result["kinds_ms"]
    assert kinds["LM-head CE op"] > 0 and kinds["matrix products"] > 0 and kinds["optimizer"] > 0
    assert result["ceiling"] > 1
    # the loss's own binding is restored afterwards
    import lcl_fast.loss as loss_module
    from lcl_fast.ops.linear_cross_entropy import linear_cross_entropy

    assert loss_module.linear_cross_entropy is linear_cross_entropy
