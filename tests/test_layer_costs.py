"""price_layer_option: each traced op priced alone on the profile's curves with its per-op overhead, and the
profile's host link and overlap reaching the search."""

import dataclasses

import pytest
from test_costmodel_formulas import v2_dict

from costmodel import Cluster, OverlapSpec, op_time_s
from planner.evaluate_config import _overlap
from planner.layer_options import LayerOption, host_bandwidth_bytes_per_s, price_layer_option
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
    cost = price_layer_option(facts(), LayerOption("replicate"), tp=1, batch_scale=1.0, cluster=cluster)
    expected = sum(op_time_s(o.flops, o.bytes_accessed, cluster, is_matmul=o.is_matmul, include_overhead=True)
                   for o in facts().ops)
    assert cost.compute_s == pytest.approx(expected)
    assert cost.compute_s > 4 * cluster.kernel_overhead_s
    # without per-op facts the layer totals are priced as one matmul and one memory-bound op, which is faster
    # (a bigger matmul sits higher on the efficiency curve, and no overhead is counted)
    totals = price_layer_option(facts(ops=[]), LayerOption("replicate"), 1, 1.0, cluster)
    assert totals.compute_s < cost.compute_s


def test_selective_recompute_repeats_the_memory_bound_forward_ops(cluster):
    cost = price_layer_option(facts(), LayerOption("replicate", "selective"), 1, 1.0, cluster)
    assert cost.recompute_s == pytest.approx(op_time_s(0.0, 4e6, cluster, is_matmul=False, include_overhead=True))


def test_profile_host_link_and_overlap_reach_the_search(cluster):
    assert host_bandwidth_bytes_per_s(cluster) == 20e9
    assert host_bandwidth_bytes_per_s(dataclasses.replace(cluster, host_link=None)) is None
    overlapped = dataclasses.replace(cluster, overlap=OverlapSpec(0.25, 0.5, 0.75, 0.0))
    assert [_overlap(overlapped, n) for n in ("fsdp_gather_overlap", "grad_reduce_overlap",
                                              "pipeline_p2p_overlap")] == [0.25, 0.5, 0.75]


@pytest.mark.parametrize("num_microbatches", [1, 2])
def test_peak_memory_holds_gradients_or_activations(num_microbatches):
    # one micro-batch: gradients (None at the start of backward) replace activations as backward runs, so the
    # peak holds the larger of the two; with accumulation the gradients persist beside the activations
    from costmodel import load_cluster
    from planner.config_space import ParallelConfig
    from planner.evaluate_config import ConfigPricer
    from planner.model_graph import build_model_graph
    from planner.model_spec import load_model_spec

    spec = load_model_spec(f"{__import__('pathlib').Path(__file__).parents[1]}/examples/gpt.py:build_gpt",
                           device="meta")
    graph = build_model_graph(spec)
    pricer = ConfigPricer(spec.model, graph, load_cluster("cpu").for_world_size(2))
    config = ParallelConfig(pp=1, dp=2, tp=1, num_microbatches=num_microbatches, schedule="none", virtual_stages=1,
                            dp_kind="zero3", replicate=1, param_dtype="float32", global_batch_size=8)
    choice = [next(p for p in pricer.priced_options(i, config) if p.option == LayerOption("replicate"))
              for i in range(len(graph.layers))]
    result = pricer.predict(config, [0], choice)
    parts = result.memory_bytes
    all_gradients = sum(c.gradients_bytes for c in choice)
    transient = parts["activations"] + parts["buffers"]
    assert result.peak_memory_bytes == sum(parts.values())
    if num_microbatches == 1:
        assert result.peak_memory_bytes == (parts["parameters"] + parts["optimizer_states"]
                                            + max(all_gradients, transient))
    else:
        assert parts["gradients"] == all_gradients
