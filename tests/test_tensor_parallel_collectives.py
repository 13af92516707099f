"""The cost model's tensor-parallel collectives are the ones DTensor runs.

For GPT's block (attention and MLP units) under `tensor` (without and with sequence parallelism) and under
`tensor2d` on every grid of tp = 4 and 8,
the collective census (tests/collective_census.py: one forward and backward of the layer, sharded by the
runtime's own code on a `fake` process group) is compared, kind, group, bytes and phase, with the list
planner/tensor_parallel_collectives.py prices for the same layer and micro-batch.
"""

from __future__ import annotations

from collections import Counter

import pytest
from collective_census import census_layer
from test_parity import GPT, force_tensor_2d, force_tensor_parallel

from planner.api import plan
from planner.model_graph import build_model_graph
from planner.model_spec import load_model_spec
from planner.tensor_parallel_collectives import (
    recomputed_collectives,
    tensor_1d_collectives,
    tensor_2d_collectives,
    tensor_sp_collectives,
)

AXIS_NAMES = {"tp": "tp", "rows": "tp_rows", "cols": "tp_cols"}


@pytest.fixture(scope="module")
def block_facts():
    graph = build_model_graph(load_model_spec(GPT, device="meta"))
    return graph, next(layer for layer in graph.layers if layer.path == "blocks.0")


@pytest.mark.parametrize(("tp", "tp_rows", "sequence_parallel"), [(4, 0, False), (4, 0, True), (4, 2, False),
                                                                 (8, 2, False), (8, 4, False)])
def test_cost_model_collectives_are_the_ones_dtensor_runs(block_facts, tp, tp_rows, sequence_parallel):
    graph, layer = block_facts
    planned = plan(GPT, "cpu", tp, mesh=(1, 1, tp))
    planned = force_tensor_2d(planned, tp_rows) if tp_rows else force_tensor_parallel(planned)
    for planned_layer in planned.layers:
        planned_layer.sequence_parallel = sequence_parallel and planned_layer.strategy == "tensor"
    recorded = Counter((c.kind, c.axis, c.group_size, c.full_bytes, c.phase) for c in census_layer(planned, "blocks.0"))
    scale = planned.micro_batch_size / graph.sample_batch_size
    if tp_rows:
        listed, sizes = tensor_2d_collectives(layer, tp_rows, tp // tp_rows, scale, param_bytes=4), \
            {"rows": tp_rows, "cols": tp // tp_rows}
    else:
        listed = (tensor_sp_collectives if sequence_parallel else tensor_1d_collectives)(layer, scale)
        sizes = {"tp": tp}
    predicted = Counter((c.kind, AXIS_NAMES[c.axis], sizes[c.axis], int(c.num_bytes), c.phase) for c in listed)
    assert recorded == predicted
    assert sum(recorded.values()) >= 4


@pytest.mark.parametrize("checkpoint", ["selective", "full"])
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp4", "tp4+sp"])
def test_recomputed_collectives_are_the_ones_checkpointing_reruns(block_facts, sequence_parallel, checkpoint):
    """A checkpointed `tensor` block (selective: op-level SAC; full) runs in backward, beyond the collectives of
    an uncheckpointed one, exactly `recomputed_collectives`: its recomputation stops before the last unit output
    is reduced (and, under sequence parallelism, before the layer output's all-gather)."""
    graph, layer = block_facts
    planned = force_tensor_parallel(plan(GPT, "cpu", 4, mesh=(1, 1, 4)))
    for planned_layer in planned.layers:
        planned_layer.sequence_parallel = sequence_parallel and planned_layer.strategy == "tensor"
    plain = Counter((c.kind, c.axis, c.group_size, c.full_bytes, c.phase) for c in census_layer(planned, "blocks.0"))
    planned.layers[[la.path for la in planned.layers].index("blocks.0")].checkpoint = checkpoint
    checkpointed = Counter((c.kind, c.axis, c.group_size, c.full_bytes, c.phase)
                           for c in census_layer(planned, "blocks.0"))
    scale = planned.micro_batch_size / graph.sample_batch_size
    listed = (tensor_sp_collectives if sequence_parallel else tensor_1d_collectives)(layer, scale)
    predicted = Counter((c.kind, AXIS_NAMES[c.axis], 4, int(c.num_bytes), c.phase)
                        for c in recomputed_collectives(listed))
    assert checkpointed - plain == predicted and not plain - checkpointed
    assert sum(predicted.values()) == (3 if sequence_parallel else 1)
