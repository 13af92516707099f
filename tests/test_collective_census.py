"""The collective census (tests/collective_census.py) on GPT's block: what DTensor runs for `tensor` (1-D) and
`tensor2d` (2 x 2 grid) layers, call by call, in one process on the fake backend of 4 ranks.

GPT here: micro-batch b = 8, sequence s = 32, hidden h = 64, MLP width 4h = 256, float32 (4 bytes). The
expected lists are written from the schemes (runtime/parallelize.py, runtime/tensor_parallel_2d.py) so the cost
model's predicted collectives can be compared with them.
"""

from __future__ import annotations

import copy

from collective_census import census_layer
from test_parity import GPT, force_tensor_2d, force_tensor_parallel

from planner.api import plan

B, S, H, F, BYTES = 8, 32, 64, 256, 4
ACTIVATION = B * S * H * BYTES
"""One unit's input or output activation, whole."""


def _gpt_plan():
    return plan(GPT, "cpu", 4, mesh=(1, 1, 4))


def _rows(calls):
    return [(c.kind, c.axis, c.group_size, c.full_bytes, c.phase) for c in calls]


def test_census_of_a_1d_tensor_parallel_block():
    """Forward: one all-reduce per unit output (attention, MLP); backward: one all-reduce of each unit input's
    gradient (MLP fc; attention q, k and v share one DTensor input, runtime/unit_input.py: one, not three)."""
    calls = census_layer(force_tensor_parallel(_gpt_plan()), "blocks.0")
    assert _rows(calls) == [("all_reduce", "tp", 4, ACTIVATION, "forward")] * 2 + \
                           [("all_reduce", "tp", 4, ACTIVATION, "backward")] * 2


def test_census_of_a_2d_tensor_parallel_block():
    """tp=4 as 2 x 2: weights all-gathered over the rows (each the column's shard: [out / cols, in]), the rowwise
    input over the columns, the unit output over the columns then the rows; backward reduce-scatters weight
    gradients over the rows and the rowwise input gradient over the columns, and once per unit (its colwise
    linears share one input) all-reduces the input gradient over the columns and all-gathers it over the rows."""
    calls = census_layer(force_tensor_2d(_gpt_plan(), 2), "blocks.0")
    half_activation = ACTIVATION // 2  # batch over the rows: b / 2 samples, all features
    attn_weight, fc_weight = H * H // 2 * BYTES, F * H // 2 * BYTES  # gathered over rows, one column's shard

    def forward_unit(colwise_weights, rowwise_weight, rowwise_input):
        return [("all_gather", "tp_rows", 2, w, "forward") for w in colwise_weights] + [
            ("all_gather", "tp_cols", 2, rowwise_input, "forward"),
            ("all_gather", "tp_rows", 2, rowwise_weight, "forward"),
            ("all_gather", "tp_cols", 2, half_activation, "forward"),
            ("all_gather", "tp_rows", 2, ACTIVATION, "forward")]

    def backward_unit(colwise_weights, rowwise_weight, rowwise_input):
        rows = [("reduce_scatter", "tp_rows", 2, rowwise_weight, "backward"),
                ("reduce_scatter", "tp_cols", 2, rowwise_input, "backward")]
        rows += [("reduce_scatter", "tp_rows", 2, w, "backward") for w in colwise_weights]
        # the unit input's gradient, summed over the colwise linears sharing it, is reduced once
        return rows + [("all_reduce", "tp_cols", 2, half_activation, "backward"),
                       ("all_gather", "tp_rows", 2, ACTIVATION, "backward")]

    attention = ([attn_weight] * 3, attn_weight, half_activation)
    mlp = ([fc_weight], fc_weight, B // 2 * S * F * BYTES)
    expected = forward_unit(*attention) + forward_unit(*mlp) + backward_unit(*mlp) + backward_unit(*attention)
    assert _rows(calls) == expected


def test_census_of_a_mixed_plan_counts_only_the_layer_asked_for():
    """A replicated layer issues nothing; a tensor2d layer beside tensor layers is counted alone."""
    mixed = force_tensor_2d(copy.deepcopy(force_tensor_parallel(_gpt_plan())), 2, paths={"blocks.1"})
    assert census_layer(mixed, "ln_f") == []
    assert {c.axis for c in census_layer(mixed, "blocks.1")} == {"tp_rows", "tp_cols"}
    assert {c.axis for c in census_layer(mixed, "blocks.0")} == {"tp"}


def test_census_sees_the_all_gather_sharding_propagation_inserts():
    """GPT-2's attention splits the fused c_attn output (sharded over the columns) into q, k and v: DTensor
    all-gathers it over the columns inside `split` (the Conv1D blind spot of runtime/conv1d_parallel.py, here on
    the grid); c_proj's input is then already whole, so its own all-gather over the columns is skipped."""
    from test_hf_models import MODELS

    calls = census_layer(force_tensor_2d(plan(MODELS["gpt2"], "cpu", 4, mesh=(1, 1, 4)), 2), "gpt.transformer.h.0")
    forward = [(c.kind, c.axis, c.full_bytes) for c in calls if c.phase == "forward"]
    micro_batch, seq, hidden = 8, 16, 64
    c_attn_output = micro_batch // 2 * seq * 3 * hidden * BYTES
    assert forward[:2] == [("all_gather", "tp_rows", hidden * 3 * hidden // 2 * BYTES),
                           ("all_gather", "tp_cols", c_attn_output)]
    assert forward[2] == ("all_gather", "tp_rows", hidden * hidden // 2 * BYTES)  # c_proj's weight: input whole
