"""Tests of the cost-model formulas added for issue 3: efficiency curves, v1 profiles, two-level collectives,
all-to-all, exposed time, offload / recompute / optimizer time, pipeline and buffer memory."""

import pytest
from test_costmodel import toy_dict

from costmodel import (
    Cluster,
    ClusterError,
    EfficiencyCurve,
    OverlapSpec,
    all_gather_time_s,
    all_reduce_time_s,
    all_to_all_time_s,
    collective_buffer_bytes,
    exposed_time_s,
    host_transfer_time_s,
    in_flight_microbatches,
    kernel_overhead_time_s,
    load_cluster,
    op_time_s,
    optimizer_bytes_per_param,
    optimizer_step_time_s,
    pipeline_bubble_fraction,
    recompute_time_s,
    reduce_scatter_time_s,
    save_cluster,
    transformer_layer_activation_bytes,
)

GB = 1e9


def v2_dict(**changes):
    data = toy_dict(schema_version=2, matmul_efficiency={"float32": [[1e6, 0.1], [1e10, 0.5]],
                                                         "bfloat16": [[1e6, 0.01], [1e10, 0.8]]},
                    memory_efficiency=[[1e4, 0.25], [1e8, 1.0]], kernel_overhead_us=10,
                    optimizer_tensor_overhead_us=20,
                    host_link={"bandwidth_gb_per_s": 20, "latency_us": 5},
                    overlap={"fsdp_all_gather": 0.5, "gradient_reduction": 1, "pipeline_p2p": 0,
                             "tensor_parallel": 0})
    data.update(changes)
    return data


@pytest.fixture
def v2():
    return Cluster.from_dict(v2_dict(), source="v2.yaml")


# ---------------------------------------------------------------------------------------------- profiles


def test_curve_interpolates_in_log_space_and_clamps():
    curve = EfficiencyCurve(((1e6, 0.1), (1e10, 0.5)))
    assert curve.at(1e8) == pytest.approx(0.3)  # halfway in log10
    assert curve.at(1e7) == pytest.approx(0.2)
    assert curve.at(10) == 0.1 and curve.at(1e15) == 0.5
    assert EfficiencyCurve.flat(0.7).at(123.0) == 0.7


def test_v2_profile_round_trips(v2, tmp_path):
    assert v2.matmul_efficiency_at(1e8, "bfloat16") == pytest.approx(0.405)
    assert v2.matmul_efficiency_at(1e8, "float16") == pytest.approx(0.3)  # float32 curve is the fallback
    assert v2.kernel_overhead_s == pytest.approx(10e-6)
    assert v2.overlap == OverlapSpec(fsdp_all_gather=0.5, gradient_reduction=1.0)
    assert Cluster.from_dict(v2.to_dict()) == v2
    save_cluster(v2, tmp_path / "v2.yaml")
    assert load_cluster(tmp_path / "v2.yaml") == v2


def test_v1_profile_loads_as_flat_curve(tmp_path):
    old = Cluster.from_dict(toy_dict(), source="old.yaml")  # schema 1, scalar matmul_efficiency 0.5
    assert old.matmul_efficiency_at(1.0) == old.matmul_efficiency_at(1e15, "bfloat16") == 0.5
    assert old.memory_efficiency.at(1.0) == 1.0 and old.kernel_overhead_s == 0.0
    assert old.overlap == OverlapSpec() and old.host_link is None
    with pytest.raises(ClusterError, match=r"no host_link in the profile.*add `host_link"):
        host_transfer_time_s(1e6, old)
    # it is written back as version 2, which reads back identically
    save_cluster(old, tmp_path / "up.yaml")
    assert load_cluster(tmp_path / "up.yaml") == old


def test_collective_overrides_round_trip(v2):
    data = v2_dict(collectives={"intra_node": {"all_gather": {"bandwidth_gb_per_s": 50, "latency_us": 20}}})
    cluster = Cluster.from_dict(data)
    assert Cluster.from_dict(cluster.to_dict()) == cluster
    # the all_gather override applies; all_reduce keeps the level's link
    assert all_gather_time_s(1e9, [0, 1], cluster) == pytest.approx(20e-6 + 0.5 * 1e9 / 50e9)
    assert all_reduce_time_s(1e9, [0, 1], cluster) == all_reduce_time_s(1e9, [0, 1], v2)


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"matmul_efficiency": [[1e6, 0.1], [1e5, 0.2]]}, r"matmul_efficiency\[1\]\[0\]' must be larger"),
        ({"matmul_efficiency": {"float32": [[1e6, 1.5]]}}, r"matmul_efficiency.float32\[0\]\[1\]' must be a number in"),
        ({"matmul_efficiency": {"bfloat16": 0.5}}, r"'matmul_efficiency' must have a 'float32' entry"),
        ({"memory_efficiency": []}, r"'memory_efficiency' must be an efficiency in \(0, 1\] or a list"),
        ({"memory_efficiency": [[1e6]]}, r"'memory_efficiency\[0\]' must be a \[size, efficiency\] pair"),
        ({"kernel_overhead_us": -1}, r"'kernel_overhead_us' must be a number >= 0"),
        ({"overlap": {"fsdp_all_gather": 2, "gradient_reduction": 0, "pipeline_p2p": 0, "tensor_parallel": 0}},
         r"'overlap.fsdp_all_gather' must be a number in \[0, 1\]"),
        ({"overlap": {"fsdp_all_gather": 0}}, r"missing field 'overlap.gradient_reduction'"),
        ({"collectives": {"intra_node": {"broadcast": {"bandwidth_gb_per_s": 1, "latency_us": 1}}}},
         r"unknown field 'collectives.intra_node.broadcast'"),
        ({"host_link": {"bandwidth_gb_per_s": 0, "latency_us": 1}}, r"'host_link.bandwidth_gb_per_s' must be"),
    ],
)
def test_v2_rejects(changes, pattern):
    with pytest.raises(ClusterError, match=pattern):
        Cluster.from_dict(v2_dict(**changes), source="x.yaml")


def test_v2_requires_new_fields():
    data = v2_dict()
    del data["overlap"]
    with pytest.raises(ClusterError, match="missing field 'overlap'"):
        Cluster.from_dict(data)


# ---------------------------------------------------------------------------------------------- compute


def test_op_time_on_curves(v2):
    # bf16 matmul of 1e8 FLOPs: efficiency 0.405 of 100 TFLOP/s
    assert op_time_s(1e8, 0, v2, "bfloat16") == pytest.approx(1e8 / (100e12 * 0.405))
    # memory-bound 1e6 bytes: efficiency halfway (log) between 0.25 and 1 -> 0.625 of 1000 GB/s
    assert op_time_s(0, 1e6, v2, is_matmul=False) == pytest.approx(1e6 / (1000e9 * 0.625))
    assert op_time_s(0, 1e6, v2, is_matmul=False, include_overhead=True) == pytest.approx(
        1e6 / (1000e9 * 0.625) + 10e-6)
    assert op_time_s(0, 0, v2) == 0.0
    assert kernel_overhead_time_s(100, v2) == pytest.approx(1e-3)


def test_recompute_is_forward_again():
    assert recompute_time_s(0.25) == 0.25
    with pytest.raises(ValueError, match="forward_time_s"):
        recompute_time_s(-1.0)


@pytest.mark.parametrize(
    ("optimizer", "dtype", "master", "expected"),
    [("sgd", "float32", False, 12), ("sgd_momentum", "float32", False, 20), ("adamw", "float32", False, 28),
     ("adam", "bfloat16", True, 28), ("sgd", "bfloat16", True, 12), ("sgd_momentum", "float16", True, 20)],
)
def test_optimizer_bytes(optimizer, dtype, master, expected):
    assert optimizer_bytes_per_param(optimizer, dtype, master) == expected


def test_optimizer_step_time_by_optimizer(v2):
    # 1e9 params of mixed-precision AdamW: 28 GB at 1000 GB/s (memory curve saturated), + 10 tensors x 20 us
    assert optimizer_step_time_s(10**9, v2, optimizer="adamw", param_dtype="bfloat16", master_weights=True,
                                 num_tensors=10) == pytest.approx(0.028 + 2e-4)
    assert optimizer_step_time_s(10**9, v2) == pytest.approx(0.032)  # the old default is kept
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        optimizer_step_time_s(10, v2, optimizer="lion")


def test_host_transfer(v2):
    assert host_transfer_time_s(2e9, v2) == pytest.approx(5e-6 + 0.1)
    assert host_transfer_time_s(0, v2) == 0.0


# ---------------------------------------------------------------------------------------------- communication


def test_all_reduce_across_nodes_is_one_ring_at_the_inter_node_link(v2):
    # 8 ranks on 2 nodes x 4: 2 * 7 * 50 us + 2 * 7/8 * 1 GB / 10 GB/s (Calculon's choice, and what the
    # published ZeRO-3 runs measure: benchmarks/published_runs.py)
    assert all_reduce_time_s(1e9, range(8), v2) == pytest.approx(2 * 7 * 50e-6 + 2 * 7 / 8 * 1e9 / 10e9)
    ranks = [0, 1, 4, 5]
    total = reduce_scatter_time_s(1e8, ranks, v2) + all_gather_time_s(1e8, ranks, v2)
    assert all_reduce_time_s(1e8, ranks, v2) == pytest.approx(total)
    # inside one node the intra-node link prices it
    assert all_reduce_time_s(1e9, range(4), v2) == pytest.approx(2 * 3 * 10e-6 + 2 * 3 / 4 * 1e9 / 100e9)


def test_uneven_group_uses_slowest_ring(v2):
    # 3 ranks on node 0, 1 on node 1: ring of 4 at the inter-node link
    assert all_gather_time_s(1e9, [0, 1, 2, 4], v2) == pytest.approx(3 * 50e-6 + 0.75 * 0.1)


def test_all_to_all(v2):
    assert all_to_all_time_s(1e9, [0, 1, 2, 3], v2) == pytest.approx(3 * 10e-6 + 0.75 * 0.01)
    # 8 ranks over 2 nodes: 7 inter latencies, and 4/8 of the message crosses nodes at 10 GB/s
    assert all_to_all_time_s(1e9, range(8), v2) == pytest.approx(7 * 50e-6 + 0.5 * 0.1)
    assert all_to_all_time_s(1e9, [2], v2) == 0.0


def test_exposed_time():
    assert exposed_time_s(1.0, 3.0, 0.0) == 1.0
    assert exposed_time_s(1.0, 3.0, 1.0) == 0.0
    assert exposed_time_s(1.0, 0.4, 1.0) == pytest.approx(0.6)  # cannot hide behind more compute than exists
    assert exposed_time_s(1.0, 3.0, 0.8) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="overlap"):
        exposed_time_s(1.0, 1.0, 1.5)


# ---------------------------------------------------------------------------------------------- memory


def test_activation_formulas_table_2():
    # Korthikanti et al. 2022, Table 2, with s=2048, b=1, h=12288, a=96 (GPT-3 175B) and t=8
    s, b, h, a, t = 2048, 1, 12288, 96, 8
    sbh = s * b * h
    assert transformer_layer_activation_bytes(s, b, h, a) == pytest.approx(sbh * (34 + 5 * a * s / h))
    assert transformer_layer_activation_bytes(s, b, h, a, t) == pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)))
    assert transformer_layer_activation_bytes(s, b, h, a, t, sequence_parallel=True) == pytest.approx(
        sbh / t * (34 + 5 * a * s / h))
    assert transformer_layer_activation_bytes(s, b, h, a, t, recompute="selective") == pytest.approx(sbh * 13)
    assert transformer_layer_activation_bytes(s, b, h, a, t, True, "selective") == pytest.approx(sbh * 34 / t)
    assert transformer_layer_activation_bytes(s, b, h, a, t, recompute="full") == 2 * sbh
    # the paper's headline: sequence parallel + selective recompute needs ~5x less than TP alone here
    ratio = (transformer_layer_activation_bytes(s, b, h, a, t)
             / transformer_layer_activation_bytes(s, b, h, a, t, True, "selective"))
    assert 4.5 < ratio < 6
    with pytest.raises(ValueError, match="recompute"):
        transformer_layer_activation_bytes(s, b, h, a, recompute="some")


def test_in_flight_microbatches():
    assert in_flight_microbatches("gpipe", 4, 0, 8) == 8
    assert [in_flight_microbatches("1f1b", 4, s, 8) for s in range(4)] == [4, 3, 2, 1]
    assert in_flight_microbatches("1f1b", 4, 0, 2) == 2
    assert in_flight_microbatches("none", 1, 0, 8) == 1
    # interleaved, stage 0 holds pp * (1 + (pp - 1) / (pp * v)) (Korthikanti et al. 2022, 4.2.3)
    pp, v = 4, 2
    assert in_flight_microbatches("interleaved_1f1b", pp, 0, 8, v) == pytest.approx(pp * (1 + (pp - 1) / (pp * v)))
    assert in_flight_microbatches("interleaved_1f1b", pp, pp - 1, 8, v) == pytest.approx(((v - 1) * pp + 1) / v)
    with pytest.raises(ValueError, match="stage"):
        in_flight_microbatches("1f1b", 4, 4, 8)
    with pytest.raises(ValueError, match="virtual_stages=2 needs"):
        in_flight_microbatches("1f1b", 4, 0, 8, 2)


def test_pipeline_bubble_fraction():
    assert pipeline_bubble_fraction("gpipe", 4, 8) == pytest.approx(3 / 11)
    assert pipeline_bubble_fraction("1f1b", 4, 8) == pytest.approx(3 / 11)
    assert pipeline_bubble_fraction("interleaved_1f1b", 4, 8, 2) == pytest.approx(3 / 19)
    assert pipeline_bubble_fraction("none", 1, 8) == 0.0
    assert pipeline_bubble_fraction("1f1b", 1, 8) == 0.0
    # bubble/ideal = (p-1)/m as in Narayanan et al. 2021
    f = pipeline_bubble_fraction("1f1b", 8, 32)
    assert f / (1 - f) == pytest.approx(7 / 32)


def test_collective_buffer_bytes():
    assert collective_buffer_bytes("all_gather", 1000, 4) == 1000
    assert collective_buffer_bytes("reduce_scatter", 1000, 1) == 0
    with pytest.raises(ValueError, match="unknown collective"):
        collective_buffer_bytes("broadcast", 1, 2)


def test_data_parallel_collectives_share_one_compute_window():
    from costmodel import OverlapSpec, data_parallel_exposed_s

    full = OverlapSpec(fsdp_all_gather=1.0, gradient_reduction=1.0)
    # gathers 3 s and reductions 2 s beside 4 s of compute: they queue on one link, so 1 s stays exposed,
    # not 0 (as if each kind had the whole window to itself)
    assert data_parallel_exposed_s(3.0, 2.0, 4.0, 4.0, full) == pytest.approx(1.0)
    # the reduction's own window (the last micro-batch's backward) limits it further
    assert data_parallel_exposed_s(1.0, 2.0, 8.0, 1.5, full) == pytest.approx(0.5)
    # no overlap: everything exposed; a fraction hides that share of what the window covers
    assert data_parallel_exposed_s(3.0, 2.0, 4.0, 4.0, OverlapSpec()) == pytest.approx(5.0)
    part = OverlapSpec(fsdp_all_gather=0.5, gradient_reduction=0.5)
    # gathers hide 0.5 * 3; the reductions 0.5 * min(2, 4 - 1.5)
    assert data_parallel_exposed_s(3.0, 2.0, 4.0, 4.0, part) == pytest.approx(5.0 - 1.5 - 1.0)
    with pytest.raises(ValueError, match="gather_s"):
        data_parallel_exposed_s(-1.0, 0.0, 1.0, 1.0, full)
