"""The planner chooses the tensor-parallel layout its cost model says is fastest, and no edit re-prices faster.

A 4-block GPT with a long sequence and narrow layers (hidden 2048, sequence 8192, micro-batch 8), pinned to
pp 2 x tp 8 on two A100 nodes, and a GPT-3-wide one (hidden 12288, sequence 2048). Each block chooses between
1-D `tensor` (with or without sequence parallelism, offered with pipelines too) and the 2-D grids; both pick
1-D (the narrow one with sequence parallelism, which shards what 2-D would gather; the wide one because its
weights are too large to gather). The plan is re-priced after editing the blocks to every other choice
(planner/recost.py, the path `meshplan validate` takes): none may be faster than what the planner chose.
Where sequence parallelism is not available (transformers Conv1D units), `benchmarks/tensor_parallel_2d.py`
shows 2-D winning.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest

from costmodel import load_cluster
from planner.api import plan
from planner.model_graph import build_model_graph
from planner.model_spec import load_model_spec
from planner.plan_schema import PlanError
from planner.recost import recost_plan

DTYPE = "bfloat16"
ROOT = Path(__file__).resolve().parents[1]


def _benchmark_module():
    """benchmarks/tensor_parallel_2d.py, loaded by path (benchmarks/ is not an installed package)."""
    spec = importlib.util.spec_from_file_location("tensor_parallel_2d_benchmark",
                                                  ROOT / "benchmarks" / "tensor_parallel_2d.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("hidden", "heads", "seq", "expected"), [(2048, 16, 8192, "tensor"),
                                                                   (12288, 96, 2048, "tensor")])
def test_blocks_choose_the_faster_tensor_parallel_layout(tmp_path, hidden, heads, seq, expected):
    source = _benchmark_module().write_gpt_model(tmp_path, hidden, heads, seq, global_batch=32)
    chosen = plan(source, "a100-80g", 16, mesh=(2, 1, 8), param_dtype=DTYPE)
    blocks = [layer for layer in chosen.layers if layer.tensor_parallel]
    assert blocks and {layer.strategy for layer in blocks} == {expected}
    spec = load_model_spec(source, device="meta")
    graph = build_model_graph(spec)
    cluster = load_cluster("a100-80g").for_world_size(16)
    best_ms = recost_plan(chosen, spec.model, graph, cluster).prediction.step_time_ms
    assert best_ms == pytest.approx(chosen.predicted.step_time_ms, rel=1e-9)
    for strategy, tp_rows, sequence in [("tensor", 0, False), ("tensor", 0, True), ("tensor2d", 2, False),
                                        ("tensor2d", 4, False)]:
        edited = copy.deepcopy(chosen)
        for layer in edited.layers:
            if layer.tensor_parallel:
                layer.strategy, layer.tp_rows, layer.sequence_parallel = strategy, tp_rows, sequence
        edited.validate("edited")
        try:
            recosted = recost_plan(edited, spec.model, graph, cluster)
        except PlanError as err:  # a grid the chosen micro-batch (or checkpoint) rules out is no rival
            assert "not offer" in str(err)
            continue
        assert recosted.prediction.step_time_ms >= best_ms - 1e-9
