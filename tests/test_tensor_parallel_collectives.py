"""The cost model's tensor-parallel collectives are the ones DTensor runs.

For a GPT block (attention and MLP units) sharded by the runtime's own code on a 4-rank `fake` process group,
every collective of one forward and one backward is recorded (tests/dtensor_collectives.py) and compared, kind,
group size and bytes, with planner/tensor_parallel_collectives.py's list for the same layer and micro-batch.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dtensor_collectives import record_collectives
from torch.testing._internal.distributed.fake_pg import FakeStore

from planner.api import plan
from planner.model_graph import build_model_graph
from planner.model_spec import load_model_spec
from planner.plan import Plan, TensorParallelUnitPlan
from planner.tensor_parallel_collectives import tensor_1d_collectives, tensor_2d_collectives
from runtime.parallelize import apply_tensor_parallel, forward_context
from runtime.train import build_mesh

ROOT = Path(__file__).resolve().parents[1]
GPT = f"{ROOT}/examples/gpt.py:build_gpt"
TP = 4
MICRO_BATCH = 4


@pytest.fixture(scope="module")
def tp_plan() -> Plan:
    return plan(GPT, "cpu", TP, mesh=(1, 1, TP))


def _shard_blocks(base: Plan, spec_layers, strategy: str, tp_rows: int) -> Plan:
    """`base` with every layer that has units sharded by `strategy`, as a person would edit it."""
    edited = copy.deepcopy(base)
    units = {f.path: f.tp_units for f in spec_layers}
    for layer in edited.layers:
        if units[layer.path]:
            layer.strategy, layer.tp_rows = strategy, tp_rows if strategy == "tensor2d" else 0
            layer.tensor_parallel = [TensorParallelUnitPlan(list(u.colwise), u.rowwise) for u in units[layer.path]]
    edited.validate()
    return edited


def _recorded(base: Plan, strategy: str, tp_rows: int) -> tuple[Counter, Counter]:
    spec = load_model_spec(GPT)
    graph = build_model_graph(load_model_spec(GPT, device="meta"))
    edited = _shard_blocks(base, graph.layers, strategy, tp_rows)
    dist.init_process_group("fake", rank=0, world_size=TP, store=FakeStore())
    try:
        mesh = build_mesh(edited, torch.device("cpu"))
        if strategy == "tensor":
            apply_tensor_parallel(spec.model, edited, mesh["tp"])
        else:
            from runtime.tensor_parallel_2d import apply_tensor_parallel_2d

            apply_tensor_parallel_2d(spec.model, edited, mesh["tp"])
        block = spec.model.blocks[0]
        x = torch.randn(MICRO_BATCH, 32, 64, requires_grad=True)
        with forward_context(edited):
            with record_collectives() as forward:
                y = block(x)
            with record_collectives() as backward:
                y.sum().backward()
    finally:
        dist.destroy_process_group()
    return Counter((c.kind, c.group_size, c.num_bytes) for c in forward.found), \
        Counter((c.kind, c.group_size, c.num_bytes) for c in backward.found)


def _predicted(strategy: str, tp_rows: int) -> tuple[Counter, Counter]:
    graph = build_model_graph(load_model_spec(GPT, device="meta"))
    layer = next(f for f in graph.layers if f.path == "blocks.0")
    scale = MICRO_BATCH / graph.sample_batch_size
    if strategy == "tensor":
        listed, sizes = tensor_1d_collectives(layer, scale), {"tp": TP}
    else:
        listed = tensor_2d_collectives(layer, tp_rows, TP // tp_rows, scale, param_bytes=4)
        sizes = {"rows": tp_rows, "cols": TP // tp_rows}
    by_phase = {"forward": Counter(), "backward": Counter()}
    for c in listed:
        by_phase[c.phase][(c.kind, sizes[c.axis], int(c.num_bytes))] += 1
    return by_phase["forward"], by_phase["backward"]


@pytest.mark.parametrize("strategy,tp_rows", [("tensor", 0), ("tensor2d", 2)])
def test_cost_model_collectives_are_the_ones_dtensor_runs(tp_plan, strategy, tp_rows):
    forward, backward = _recorded(tp_plan, strategy, tp_rows)
    predicted_forward, predicted_backward = _predicted(strategy, tp_rows)
    assert forward == predicted_forward
    assert backward == predicted_backward
    assert sum(forward.values()) > 0 and sum(backward.values()) > 0
