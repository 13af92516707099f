"""layer_cost: per-op pricing on the profile's curves with per-op overhead, and overlap of communication."""

import dataclasses

import pytest
from test_costmodel_formulas import v2_dict

from costmodel import Cluster, OverlapSpec, all_gather_time_s, op_time_s, reduce_scatter_time_s
from planner.layer_costs import dp_group, layer_cost
from planner.model_graph import LayerFacts, OpFacts


@pytest.fixture
def cluster():
    return Cluster.from_dict(v2_dict())


def facts(**changes) -> LayerFacts:
    ops = [OpFacts("forward", 2e8, 0.0, True, False), OpFacts("forward", 0.0, 4e6, False, False),
           OpFacts("backward", 4e8, 0.0, True, False), OpFacts("backward", 0.0, 8e6, False, False)]
    layer = LayerFacts(path="blocks.0", kind="k", num_params=10_000_000, param_bytes=40_000_000,
                       fwd_flops=2e8, bwd_flops=4e8, fwd_bytes=4e6, bwd_bytes=8e6, saved_bytes=1000, ops=ops)
    return dataclasses.replace(layer, **changes)


def test_each_op_is_priced_alone_with_overhead(cluster):
    cost = layer_cost(facts(), "replicate", dp=1, tp=1, batch_scale=1.0, cluster=cluster)
    expected = sum(op_time_s(o.flops, o.bytes_accessed, cluster, is_matmul=o.is_matmul, include_overhead=True)
                   for o in facts().ops)
    assert cost.compute_s == pytest.approx(expected)
    assert cost.compute_s > 4 * cluster.kernel_overhead_s
    # two small matmuls are less efficient than one of their summed size: per-op pricing is slower
    summed = facts(ops=[])
    assert layer_cost(summed, "replicate", 1, 1, 1.0, cluster).compute_s < cost.compute_s


def test_overlap_hides_fsdp_communication(cluster):
    hidden = dataclasses.replace(cluster, overlap=OverlapSpec(fsdp_all_gather=1.0, gradient_reduction=1.0))
    exposed = dataclasses.replace(cluster, overlap=OverlapSpec())
    exposed_cost = layer_cost(facts(), "replicate", 4, 1, 1.0, exposed)
    group = dp_group(4, 1)
    full = 2 * all_gather_time_s(40_000_000, group, cluster) + reduce_scatter_time_s(40_000_000, group, cluster)
    assert exposed_cost.communication_s == pytest.approx(full)
    hidden_cost = layer_cost(facts(), "replicate", 4, 1, 1.0, hidden)
    # fully overlappable communication is hidden up to the compute it runs under
    assert hidden_cost.communication_s == pytest.approx(max(0.0, full - exposed_cost.compute_s), abs=1e-9)
    assert hidden_cost.communication_s < exposed_cost.communication_s
