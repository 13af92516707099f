"""Layer pricing: per-op pricing on the profile's curves with per-op overhead, checkpointing, and overlap of
data-parallel communication."""

import dataclasses

import pytest
from test_costmodel_formulas import v2_dict
from torch import nn

from costmodel import Cluster, OverlapSpec, all_gather_time_s, op_time_s, reduce_scatter_time_s
from planner.config_space import ParallelConfig
from planner.layer_options import LayerOption, price_layer_option
from planner.model_graph import LayerFacts, OpFacts


@pytest.fixture
def cluster():
    return Cluster.from_dict(v2_dict())


def facts(**changes) -> LayerFacts:
    ops = [OpFacts("forward", 2e8, 0.0, True, False), OpFacts("forward", 0.0, 4e6, False, False),
           OpFacts("backward", 4e8, 0.0, True, False), OpFacts("backward", 0.0, 8e6, False, False)]
    layer = LayerFacts(path="blocks.0", kind="k", num_params=10_000_000, param_bytes=40_000_000,
                       fwd_flops=2e8, bwd_flops=4e8, fwd_bytes=4e6, bwd_bytes=8e6, saved_bytes=1000,
                       matmul_saved_bytes=400, input_bytes=100, ops=ops)
    return dataclasses.replace(layer, **changes)


def cpu_profile(cluster: Cluster) -> Cluster:
    return dataclasses.replace(cluster, device_type="cpu", backend="gloo")


def phase_s(ops, cluster: Cluster, phase: str, overhead_s: float | None = None) -> float:
    """The independent reference of one phase: every op on its own curve, and its launch overhead on the host;
    CPU processes add the two, a CUDA host runs ahead of the device (the slower one bounds the phase)."""
    chosen = [o for o in ops if o.phase == phase]
    device_s = sum(op_time_s(o.flops, o.bytes_accessed, cluster, is_matmul=o.is_matmul) for o in chosen)
    host_s = len(chosen) * (cluster.kernel_overhead_s if overhead_s is None else overhead_s)
    return device_s + host_s if cluster.device_type == "cpu" else max(device_s, host_s)


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_each_op_is_priced_alone_with_overhead(cluster, device_type):
    profile = cpu_profile(cluster) if device_type == "cpu" else cluster
    cost = price_layer_option(facts(), LayerOption("replicate"), 1, 1.0, profile)
    expected = phase_s(facts().ops, profile, "forward") + phase_s(facts().ops, profile, "backward")
    assert cost.compute_s == pytest.approx(expected)
    if device_type == "cpu":
        assert cost.compute_s == pytest.approx(sum(
            op_time_s(o.flops, o.bytes_accessed, profile, is_matmul=o.is_matmul, include_overhead=True)
            for o in facts().ops))
        # without per-op facts the layer is one matmul and one memory-bound op a phase, launch overhead unpriced
        summed = facts(ops=[])
        assert price_layer_option(summed, LayerOption("replicate"), 1, 1.0, profile).compute_s < cost.compute_s


def test_a_cuda_host_runs_ahead_of_the_device(cluster):
    # launch-bound ops cost their launches, compute-bound ones their device time, never the sum
    tiny = [OpFacts("forward", 1e3, 0.0, True, False)] * 10
    big = [OpFacts("forward", 1e12, 0.0, True, False)]
    for ops in (tiny, big):
        cost = price_layer_option(facts(ops=ops), LayerOption("replicate"), 1, 1.0, cluster)
        device_s = sum(op_time_s(o.flops, 0.0, cluster) for o in ops)
        assert cost.compute_s == pytest.approx(max(device_s, len(ops) * cluster.kernel_overhead_s))
    assert price_layer_option(facts(ops=tiny), LayerOption("replicate"), 1, 1.0, cluster).compute_s == \
        pytest.approx(10 * cluster.kernel_overhead_s)


def test_checkpointing_trades_recompute_for_activations(cluster):
    layer = facts()
    none, selective, full = (price_layer_option(layer, LayerOption("replicate", c), 1, 1.0, cluster)
                             for c in ("none", "selective", "full"))
    assert (none.activation_bytes, selective.activation_bytes, full.activation_bytes) == (1000, 500, 100)
    assert full.recompute_s == pytest.approx(phase_s(layer.ops, cluster, "forward"))
    assert 0 < selective.recompute_s < full.recompute_s and none.recompute_s == 0


def test_overlap_hides_fsdp_communication(cluster):
    from planner.evaluate_config import ConfigPricer
    from planner.model_graph import ModelGraph

    def priced(profile):
        graph = ModelGraph(graph=None, layers=[facts()], sample_batch_size=1, fingerprint="", num_params=10_000_000)
        model = nn.ModuleDict({"blocks": nn.ModuleList([nn.Linear(2, 2)])})  # only its module tree is read
        pricer = ConfigPricer(model, graph, profile)
        config = ParallelConfig(1, 4, 1, 1, "none", 1, "zero3", 1, "float32", 4)
        return next(p for p in pricer.priced_options(0, config) if p.option == LayerOption("replicate"))

    exposed = priced(dataclasses.replace(cluster, overlap=OverlapSpec()))
    group = [0, 1, 2, 3]
    full = 2 * all_gather_time_s(40_000_000, group, cluster) + reduce_scatter_time_s(40_000_000, group, cluster)
    assert exposed.step_communication_s == pytest.approx(full)
    hidden = priced(dataclasses.replace(cluster, overlap=OverlapSpec(fsdp_all_gather=1.0, gradient_reduction=1.0)))
    assert hidden.step_communication_s < exposed.step_communication_s
    assert hidden.step_communication_s >= full - 2 * exposed.micro.compute_s - 1e-12


def test_sequence_parallel_shards_the_rest_of_the_layer(cluster):
    # 600 of the 1000 saved bytes are inside tensor-parallel units: tp4 keeps 400 + 150; with sequence
    # parallelism the norms and residual shard too: 100 + 150 (Korthikanti et al. 2022, section 4.2.2)
    layer = facts(ops=[], tp_saved_bytes=600, tp_allreduce_bytes=4000, tp_units=["unit"], input_bytes=200)
    plain = price_layer_option(layer, LayerOption("tensor"), 4, 1.0, cluster)
    sequence = price_layer_option(layer, LayerOption("tensor", sequence_parallel=True), 4, 1.0, cluster)
    assert (plain.activation_bytes, sequence.activation_bytes) == (550, 250)
    # the all-reduces become reduce-scatter + all-gather (same bytes), plus gathering the layer's output
    assert sequence.tp_communication_s > plain.tp_communication_s
    assert sequence.compute_s < plain.compute_s


@pytest.mark.parametrize("num_microbatches", [1, 2])
def test_peak_memory_holds_gradients_or_activations(num_microbatches):
    # one micro-batch: gradients (None at the start of backward) replace activations as backward runs, so the
    # peak holds the larger of the two; with accumulation the gradients persist beside the activations
    from pathlib import Path

    from costmodel import load_cluster
    from planner.evaluate_config import ConfigPricer
    from planner.model_graph import build_model_graph
    from planner.model_spec import load_model_spec

    spec = load_model_spec(f"{Path(__file__).parents[1]}/examples/gpt.py:build_gpt", device="meta")
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


def test_tensor_parallel_ops_pay_the_dtensor_overhead(cluster):
    ops = [OpFacts("forward", 2e8, 0.0, True, True), OpFacts("forward", 0.0, 4e6, False, False)]
    layer = facts(ops=ops)
    cpu = cpu_profile(cluster)
    plain = price_layer_option(layer, LayerOption("tensor"), 2, 1.0, cpu)
    slow = dataclasses.replace(cpu, dtensor_op_overhead_s=1e-3)
    dtensor = price_layer_option(layer, LayerOption("tensor"), 2, 1.0, slow)
    # only the tensor-parallel op swaps its plain overhead for the DTensor one
    assert dtensor.compute_s - plain.compute_s == pytest.approx(1e-3 - cluster.kernel_overhead_s)
    replicated = price_layer_option(layer, LayerOption("replicate"), 2, 1.0, slow)
    assert replicated.compute_s == pytest.approx(price_layer_option(layer, LayerOption("replicate"), 2, 1.0,
                                                                    cpu).compute_s)
    # on CUDA the DTensor dispatch hides under the device's work until the host becomes the slower side
    cuda = dataclasses.replace(cluster, dtensor_op_overhead_s=1e-3)
    host_s = 1e-3 + cluster.kernel_overhead_s
    device_s = sum(op_time_s(o.flops / (2 if o.tensor_parallel else 1), o.bytes_accessed, cluster,
                             is_matmul=o.is_matmul) for o in ops)
    assert price_layer_option(layer, LayerOption("tensor"), 2, 1.0, cuda).compute_s == pytest.approx(
        max(device_s, host_s))


def test_sequence_parallel_keeps_norm_parameters_replicated(cluster):
    # only the units' weights shard over tp; SequenceParallel replicates norm parameters
    layer = facts(ops=[], tp_num_params=6_000_000, tp_units=["unit"])
    plain = price_layer_option(layer, LayerOption("tensor"), 4, 1.0, cluster)
    sequence = price_layer_option(layer, LayerOption("tensor", sequence_parallel=True), 4, 1.0, cluster)
    assert plain.local_num_params == sequence.local_num_params == 4_000_000 + 1_500_000
