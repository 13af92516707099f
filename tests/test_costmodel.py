"""Tests of costmodel: cluster profiles and their YAML, roofline, alpha-beta collectives, ZeRO memory."""

import dataclasses

import pytest

from costmodel import (
    Cluster,
    ClusterError,
    LinkSpec,
    ModelStateBytes,
    all_gather_time_s,
    all_reduce_time_s,
    dtype_bytes,
    list_presets,
    load_cluster,
    model_state_bytes,
    op_time_s,
    optimizer_step_time_s,
    point_to_point_time_s,
    reduce_scatter_time_s,
    save_cluster,
    sharded_model_state_bytes,
)

GB = 1e9


def toy_dict(**changes):
    """A 2-node x 4-device profile with round numbers, in YAML form."""
    data = {
        "schema_version": 1,
        "name": "toy",
        "device_type": "cuda",
        "backend": "nccl",
        "num_nodes": 2,
        "devices_per_node": 4,
        "device_memory_gib": 16,
        "usable_memory_fraction": 0.5,
        "peak_tflops": {"float32": 10, "bfloat16": 100},
        "matmul_efficiency": 0.5,
        "memory_bandwidth_gb_per_s": 1000,
        "intra_node": {"bandwidth_gb_per_s": 100, "latency_us": 10},
        "inter_node": {"bandwidth_gb_per_s": 10, "latency_us": 50},
    }
    data.update(changes)
    return data


@pytest.fixture
def toy():
    return Cluster.from_dict(toy_dict(), source="toy.yaml")


# ---------------------------------------------------------------------------------------------- profiles


def test_presets_listed():
    assert list_presets() == ["a100-40g", "a100-80g", "cpu", "h100", "h200", "l40s"]


def test_a100_preset_numbers():
    cluster = load_cluster("a100-80g")
    assert cluster.device_type == "cuda" and cluster.backend == "nccl"
    assert cluster.world_size == 8
    assert cluster.device_memory_bytes == 80 * 2**30
    assert cluster.usable_memory_bytes == int(80 * 2**30 * 0.9)
    assert cluster.peak_flops_per_s == {"float32": 19.5e12, "bfloat16": 312e12, "float16": 312e12}
    assert cluster.memory_bandwidth_bytes_per_s == 2039 * GB
    assert cluster.intra_node == LinkSpec(240 * GB, 10e-6)
    assert cluster.inter_node == LinkSpec(23 * GB, 20e-6)
    assert cluster.host_link == LinkSpec(25 * GB, 10e-6)
    assert cluster.kernel_overhead_s == pytest.approx(8e-6)
    assert cluster.matmul_efficiency["bfloat16"].points[-1] == (1e12, 0.8)
    # fsdp_all_gather is fitted over the published runs (benchmarks/published_runs.py --fit)
    assert cluster.overlap.fsdp_all_gather == 0.25 and cluster.overlap.tensor_parallel == 0.0


def test_cpu_preset_numbers():
    cluster = load_cluster("cpu")
    assert (cluster.device_type, cluster.backend, cluster.devices_per_node) == ("cpu", "gloo", 8)
    assert cluster.device_memory_bytes == 2 * 2**30
    assert cluster.peak_flops_per_s == pytest.approx({"float32": 0.05e12, "bfloat16": 0.01e12})
    assert cluster.inter_node.latency_s == pytest.approx(500e-6)


@pytest.mark.parametrize("name", ["a100-40g", "a100-80g", "cpu", "h100", "h200", "l40s"])
def test_preset_round_trips(name, tmp_path):
    cluster = load_cluster(name)
    assert Cluster.from_dict(cluster.to_dict()) == cluster
    path = tmp_path / f"{name}.yaml"
    save_cluster(cluster, path)
    assert load_cluster(str(path)) == cluster
    assert load_cluster(path) == cluster
    assert hash(load_cluster(path)) == hash(cluster)


def test_odd_numbers_round_trip_exactly(toy, tmp_path):
    cluster = dataclasses.replace(
        toy,
        memory_bandwidth_bytes_per_s=1.2345678901234e9,
        intra_node=LinkSpec(bandwidth_bytes_per_s=3.3e10 / 7, latency_s=1.7e-6 / 3),
        peak_flops_per_s={"float32": 1e13 / 3},
    )
    save_cluster(cluster, tmp_path / "odd.yaml")
    assert load_cluster(tmp_path / "odd.yaml") == cluster


def test_cluster_is_frozen_and_copies_its_peak_table(toy):
    table = {"float32": 1e12}
    cluster = dataclasses.replace(toy, peak_flops_per_s=table)
    table["float32"] = 5.0
    assert cluster.peak_flops_per_s["float32"] == 1e12
    with pytest.raises(dataclasses.FrozenInstanceError):
        cluster.num_nodes = 3


# ---------------------------------------------------------------------------------------------- errors


def test_unknown_preset_lists_presets():
    with pytest.raises(ClusterError, match=r"unknown cluster preset 'h900'.*a100-40g, a100-80g, cpu, h100, h200, l40s"):
        load_cluster("h900")


def test_missing_file(tmp_path):
    with pytest.raises(ClusterError, match="cannot read"):
        load_cluster(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        (toy_dict(gpus=8), r"cluster 'x.yaml': unknown field 'gpus'"),
        (toy_dict(intra_node={"bandwidth_gb_per_s": 1, "latency_us": 1, "jitter_us": 1}),
         r"unknown field 'intra_node.jitter_us'"),
        ({k: v for k, v in toy_dict().items() if k != "backend"}, r"missing field 'backend'"),
        (toy_dict(inter_node={"bandwidth_gb_per_s": 1}), r"missing field 'inter_node.latency_us'"),
        (toy_dict(devices_per_node=-1), r"field 'devices_per_node' must be a positive integer, got -1"),
        (toy_dict(num_nodes="2"), r"field 'num_nodes' must be a positive integer, got '2'"),
        (toy_dict(num_nodes=1.5), r"field 'num_nodes' must be a positive integer"),
        (toy_dict(device_memory_gib=-80), r"field 'device_memory_gib' must be a number > 0, got -80"),
        (toy_dict(device_memory_gib="80GB"), r"field 'device_memory_gib' must be a number > 0"),
        (toy_dict(usable_memory_fraction=1.5),
         r"field 'usable_memory_fraction' must be a number in \(0, 1\], got 1.5"),
        (toy_dict(matmul_efficiency=0), r"field 'matmul_efficiency' must be a number in \(0, 1\]"),
        (toy_dict(matmul_efficiency=True), r"field 'matmul_efficiency' must be .*, got True"),
        (toy_dict(num_nodes=True), r"field 'num_nodes' must be a positive integer, got True"),
        (toy_dict(memory_bandwidth_gb_per_s=float("nan")), r"field 'memory_bandwidth_gb_per_s'"),
        (toy_dict(inter_node={"bandwidth_gb_per_s": 0, "latency_us": 1}),
         r"field 'inter_node.bandwidth_gb_per_s' must be a number > 0"),
        (toy_dict(inter_node={"bandwidth_gb_per_s": 1, "latency_us": -1}),
         r"field 'inter_node.latency_us' must be a number >= 0"),
        (toy_dict(intra_node=[100, 10]), r"field 'intra_node' must be a mapping"),
        (toy_dict(peak_tflops={"bfloat16": 312}), r"'peak_tflops' must have a 'float32' entry"),
        (toy_dict(peak_tflops={"float32": 1, "fp16": 2}), r"field 'peak_tflops.fp16' must be a torch dtype"),
        (toy_dict(peak_tflops={"float32": False}), r"field 'peak_tflops.float32'"),
        (toy_dict(device_type="tpu"), r"field 'device_type' must be one of 'cpu', 'cuda'"),
        (toy_dict(device_type="cpu"), r"field 'backend' must be 'gloo' when device_type is 'cpu'"),
        (toy_dict(schema_version=3), r"field 'schema_version' must be one of \(1, 2\)"),
        (toy_dict(name=""), r"field 'name' must be a non-empty string"),
        (toy_dict(description=7), r"field 'description' must be a string"),
    ],
)
def test_from_dict_rejects(data, pattern):
    with pytest.raises(ClusterError, match=pattern):
        Cluster.from_dict(data, source="x.yaml")


def test_yaml_list_at_top_level(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- name: a\n- name: b\n")
    with pytest.raises(ClusterError, match="top level must be a mapping"):
        load_cluster(path)


def test_yaml_syntax_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ClusterError, match=r"broken.yaml.*not valid YAML"):
        load_cluster(path)


def test_python_tag_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ClusterError, match="python/object"):
        load_cluster(path)


def test_direct_construction_is_validated(toy):
    with pytest.raises(ClusterError, match=r"field 'usable_memory_fraction'"):
        dataclasses.replace(toy, usable_memory_fraction=0.0)
    with pytest.raises(ClusterError, match=r"field 'latency_s'"):
        LinkSpec(bandwidth_bytes_per_s=1.0, latency_s=-1.0)


# ---------------------------------------------------------------------------------------------- topology


def test_node_of_and_link_for(toy):
    assert [toy.node_of(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert toy.link_for([0, 1, 2, 3]) is toy.intra_node
    assert toy.link_for([4, 7]) is toy.intra_node
    assert toy.link_for([5]) is toy.intra_node
    assert toy.link_for([3, 4]) is toy.inter_node
    assert toy.link_for(range(8)) is toy.inter_node


def test_rank_outside_cluster(toy):
    with pytest.raises(ValueError, match=r"rank 8 is outside .*for_world_size"):
        toy.node_of(8)
    with pytest.raises(ValueError, match="rank -1"):
        toy.link_for([0, -1])
    with pytest.raises(ValueError, match="empty"):
        toy.link_for([])


def test_for_world_size(toy):
    assert toy.for_world_size(16).num_nodes == 4
    assert toy.for_world_size(9).num_nodes == 3
    assert toy.for_world_size(9).world_size == 12
    assert toy.for_world_size(1).num_nodes == 1
    assert toy.for_world_size(4).num_nodes == 1
    assert toy.for_world_size(16).intra_node == toy.intra_node
    assert toy.num_nodes == 2  # the original is untouched
    for bad in (0, -3, True, 2.0):
        with pytest.raises(ClusterError, match="world_size must be a positive integer"):
            toy.for_world_size(bad)


# ---------------------------------------------------------------------------------------------- communication


def test_all_reduce_intra_node(toy):
    # 2(n-1) alpha + 2(n-1)/n bytes / B with n=4, alpha=10 us, B=100 GB/s, 1 GB
    assert all_reduce_time_s(1e9, [0, 1, 2, 3], toy) == pytest.approx(6 * 10e-6 + 1.5 * 0.01)
    assert all_reduce_time_s(1e9, [0, 1, 2, 3], toy) == pytest.approx(0.01506)


def test_all_reduce_across_nodes(toy):
    # n=2 over the inter-node link: 2 * 50 us + 1 * 1 GB / 10 GB/s
    assert all_reduce_time_s(1e9, [0, 4], toy) == pytest.approx(0.1001)


def test_all_gather_and_reduce_scatter(toy):
    # (n-1) alpha + (n-1)/n bytes / B with n=4 intra: 3 * 10 us + 0.75 * 0.01 s
    assert all_gather_time_s(1e9, [0, 1, 2, 3], toy) == pytest.approx(0.00753)
    assert reduce_scatter_time_s(1e9, [0, 1, 2, 3], toy) == pytest.approx(0.00753)
    # n=8 on 2 nodes x 4: one ring of 8 at the inter-node link (7 * 50 us + 7/8 * 1 GB / 10 GB/s)
    assert all_gather_time_s(1e9, range(8), toy) == pytest.approx(7 * 50e-6 + 0.0875)


def test_all_reduce_is_reduce_scatter_plus_all_gather(toy):
    ranks = [0, 2, 5, 7]
    total = reduce_scatter_time_s(3e8, ranks, toy) + all_gather_time_s(3e8, ranks, toy)
    assert all_reduce_time_s(3e8, ranks, toy) == pytest.approx(total)


def test_point_to_point(toy):
    assert point_to_point_time_s(1e6, 0, 5, toy) == pytest.approx(50e-6 + 1e6 / 10e9)
    assert point_to_point_time_s(1e6, 0, 1, toy) == pytest.approx(10e-6 + 1e6 / 100e9)
    assert point_to_point_time_s(1e6, 3, 3, toy) == 0.0


def test_single_rank_costs_nothing(toy):
    assert all_reduce_time_s(1e9, [3], toy) == 0.0
    assert all_gather_time_s(1e9, [3], toy) == 0.0
    assert reduce_scatter_time_s(1e9, [3], toy) == 0.0


def test_collective_input_errors(toy):
    with pytest.raises(ValueError, match="message_bytes"):
        all_reduce_time_s(-1, [0, 1], toy)
    with pytest.raises(ValueError, match="distinct"):
        all_gather_time_s(10, [0, 0], toy)
    with pytest.raises(ValueError, match="empty"):
        reduce_scatter_time_s(10, [], toy)


# ---------------------------------------------------------------------------------------------- compute


def test_dtype_bytes():
    assert [dtype_bytes(d) for d in ("float32", "bfloat16", "float16", "float64", "int64", "int32")] == [
        4, 2, 2, 8, 8, 4]
    assert [dtype_bytes(d) for d in ("int8", "uint8", "bool")] == [1, 1, 1]
    assert dtype_bytes("torch.bfloat16") == 2
    with pytest.raises(ValueError, match=r"unknown dtype 'fp8'.*float32"):
        dtype_bytes("fp8")


def test_roofline_compute_bound():
    a100 = load_cluster("a100-80g")
    # 1 TFLOP bf16 matmul touching 1 MB: at the last point of the bf16 curve, 1e12 / (312e12 * 0.8) s
    assert op_time_s(1e12, 1e6, a100, dtype="bfloat16") == pytest.approx(1e12 / (312e12 * 0.8))
    # same work in float32 uses the float32 peak and curve
    assert op_time_s(1e12, 1e6, a100, dtype="float32") == pytest.approx(1e12 / (19.5e12 * 0.9))
    # not a matmul: full peak
    assert op_time_s(1e12, 1e6, a100, dtype="bfloat16", is_matmul=False) == pytest.approx(1e12 / 312e12)


def test_roofline_memory_bound():
    a100 = load_cluster("a100-80g")
    # elementwise op: 1 MFLOP, 1 GB moved -> 1e9 / (2039e9 * 0.85) s (last point of the memory curve)
    assert op_time_s(1e6, 1e9, a100, dtype="bfloat16", is_matmul=False) == pytest.approx(1e9 / (2039e9 * 0.85))


def test_roofline_dtype_falls_back_to_float32(toy):
    assert op_time_s(1e12, 0, toy, dtype="int8") == op_time_s(1e12, 0, toy, dtype="float32")
    assert op_time_s(1e12, 0, toy, dtype="float32") == pytest.approx(1e12 / (10e12 * 0.5))
    with pytest.raises(ValueError, match="flops"):
        op_time_s(-1, 0, toy)


def test_optimizer_step_time(toy):
    # 1e9 params * 32 B / 1000 GB/s
    assert optimizer_step_time_s(10**9, toy) == pytest.approx(0.032)
    assert optimizer_step_time_s(10**9, toy, bytes_per_param_touched=16) == pytest.approx(0.016)


# ---------------------------------------------------------------------------------------------- memory


def test_model_state_bytes():
    fp32 = model_state_bytes(1000)
    assert fp32 == ModelStateBytes(4000, 4000, 8000)
    assert fp32.total_bytes == 16000
    mixed = model_state_bytes(1000, "bfloat16", "adamw", master_weights=True)
    assert mixed == ModelStateBytes(parameters_bytes=2000, gradients_bytes=2000, optimizer_states_bytes=12000)
    assert model_state_bytes(1000, optimizer="sgd").optimizer_states_bytes == 0
    assert model_state_bytes(1000, optimizer="sgd_momentum").optimizer_states_bytes == 4000
    assert model_state_bytes(1000, optimizer="adam") == fp32
    with pytest.raises(ValueError, match=r"unknown optimizer 'lion'.*adamw.*sgd_momentum"):
        model_state_bytes(1000, optimizer="lion")
    with pytest.raises(ValueError, match="num_params"):
        model_state_bytes(-1)


@pytest.mark.parametrize(("stage", "expected_gb"), [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.88)])
def test_zero_paper_figures(stage, expected_gb):
    # ZeRO paper, Figure 1: 7.5B parameters, mixed-precision Adam (K = 12), data parallel degree 64.
    state = model_state_bytes(7_500_000_000, "float16", "adamw", master_weights=True)
    assert state.total_bytes == 16 * 7_500_000_000
    per_device = sharded_model_state_bytes(state, shard_degree=64, zero_stage=stage)
    assert per_device.total_bytes / GB == pytest.approx(expected_gb, rel=0.01)


def test_sharding_uses_ceil_division():
    state = ModelStateBytes(10, 10, 10)
    assert sharded_model_state_bytes(state, 3, 0) == state
    assert sharded_model_state_bytes(state, 3, 1) == ModelStateBytes(10, 10, 4)
    assert sharded_model_state_bytes(state, 3, 2) == ModelStateBytes(10, 4, 4)
    assert sharded_model_state_bytes(state, 3, 3) == ModelStateBytes(4, 4, 4)
    assert sharded_model_state_bytes(state, 1, 3) == state
    with pytest.raises(ValueError, match="zero_stage"):
        sharded_model_state_bytes(state, 2, 4)
    with pytest.raises(ValueError, match="shard_degree"):
        sharded_model_state_bytes(state, 0, 1)
