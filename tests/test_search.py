"""The search space and the formulas the search relies on: configurations, pipeline schedules, data-parallel
state memory, and what the search reports."""

from pathlib import Path

import pytest

from costmodel import load_cluster
from planner.config_space import enumerate_configs
from planner.data_parallel_costs import DataParallelSetup, rank_state_bytes
from planner.evaluate_config import ConfigPricer, even_stage_starts, pipeline_step_factor
from planner.search import InfeasiblePlanError

GB = 10**9
GPT = f"{Path(__file__).resolve().parents[1]}/examples/gpt.py:build_gpt"


def test_configurations_respect_nodes_batch_and_chain():
    configs = enumerate_configs(world_size=16, devices_per_node=8, num_layers=6, global_batch_size=32)
    assert configs, "something must be enumerable"
    for c in configs:
        assert c.pp * c.dp * c.tp == 16
        assert c.tp <= 8 and c.pp <= 6
        assert 32 % (c.dp * c.num_microbatches) == 0
        assert c.pp == 1 or c.num_microbatches >= c.pp
        assert (c.schedule == "none") == (c.pp == 1)
        assert c.virtual_stages == 1 or (c.schedule == "interleaved_1f1b" and c.pp * c.virtual_stages <= 6)
        assert c.replicate == 1 or (c.dp_kind != "ddp" and c.dp % c.replicate == 0)
    # data parallelism spanning two nodes offers HSDP with one replica per node
    assert any(c.dp == 16 and c.replicate == 2 for c in configs)
    assert len(configs) == len(set(configs))


def test_pinned_mesh_only_varies_the_rest():
    configs = enumerate_configs(8, 8, 8, 16, mesh=(2, 2, 2))
    assert {(c.pp, c.dp, c.tp) for c in configs} == {(2, 2, 2)}
    assert {c.schedule for c in configs} == {"1f1b", "gpipe", "interleaved_1f1b"}


def test_pipeline_step_factor_is_micro_batches_plus_bubble():
    # bubble fraction (pp - 1) / (m + pp - 1), divided by v when interleaved (Narayanan et al. 2021)
    assert pipeline_step_factor(4, 8) == pytest.approx(11)
    assert pipeline_step_factor(4, 8, 2) == pytest.approx(9.5)
    assert pipeline_step_factor(1, 8) == 8


def test_stages_on_one_rank_share_its_in_flight_count():
    from planner.model_graph import build_model_graph
    from planner.model_spec import load_model_spec

    spec = load_model_spec(GPT, device="meta")
    pricer = ConfigPricer(spec.model, build_model_graph(spec), load_cluster("cpu"))
    config = next(c for c in enumerate_configs(4, 8, 8, 8, mesh=(2, 2, 1)) if c.virtual_stages == 2)
    in_flight = pricer.in_flight(config)
    assert len(in_flight) == 4 and in_flight[0] == in_flight[2] and in_flight[1] == in_flight[3]
    assert in_flight[0] > in_flight[1]


def test_zero_state_memory_matches_the_paper_table():
    # ZeRO paper (Rajbhandari et al. 2020) figure 1: 7.5B parameters, dp 64, mixed-precision Adam (K = 12):
    # 120 GB (DDP), 31.4 GB (stage 1), 16.6 GB (stage 2), 1.88 GB (stage 3)
    expected = {"ddp": 120, "zero1": 31.4, "zero2": 16.6, "zero3": 1.875}
    for kind, gb in expected.items():
        setup = DataParallelSetup(kind=kind, dp=64, tp=1, param_dtype="float16")
        assert rank_state_bytes(7_500_000_000, setup).total_bytes / GB == pytest.approx(gb, rel=0.01)
    # HSDP with 8 replicas shards over 8 ranks only; gradient accumulation keeps unsharded gradients
    hsdp = DataParallelSetup(kind="zero3", dp=64, tp=1, replicate=8, param_dtype="float16")
    assert rank_state_bytes(7_500_000_000, hsdp).total_bytes / GB == pytest.approx(120 / 8, rel=0.01)
    accumulating = DataParallelSetup(kind="zero2", dp=64, tp=1, num_microbatches=4, param_dtype="float16")
    assert rank_state_bytes(7_500_000_000, accumulating).gradients_bytes == 15 * GB


def test_pipelines_offer_ddp_and_zero1_reduced_once_per_step():
    """pp x dp with ddp / zero1 (Megatron-LM's layout, runtime/pipeline.py wraps stages in DDP) is in the space
    and priced as without a pipeline: one all-reduce per step whatever the micro-batch count, ddp's full states,
    zero1's optimizer states / dp, no parameter gathers; the reduction overlaps the last micro-batch only."""
    from planner.data_parallel_costs import data_parallel_time_s, parameter_gathers_per_step

    kinds = {c.dp_kind for c in enumerate_configs(8, 8, 8, 16, mesh=(2, 2, 2))}
    assert kinds == {"ddp", "zero1", "zero2", "zero3"}
    cluster = load_cluster("cpu")
    params = 1_000_000
    for kind in ("ddp", "zero1"):
        flat = DataParallelSetup(kind=kind, dp=4, tp=1)
        for m in (1, 4, 8):
            piped = DataParallelSetup(kind=kind, dp=4, tp=1, num_microbatches=m, pipelined=True)
            assert rank_state_bytes(params, piped) == rank_state_bytes(params, flat)
            assert data_parallel_time_s(params, piped, cluster) == data_parallel_time_s(params, flat, cluster)
            assert parameter_gathers_per_step(piped) == 0
    ddp = rank_state_bytes(params, DataParallelSetup(kind="ddp", dp=4, tp=1, pipelined=True))
    zero1 = rank_state_bytes(params, DataParallelSetup(kind="zero1", dp=4, tp=1, pipelined=True))
    assert zero1.parameters_bytes == ddp.parameters_bytes and zero1.gradients_bytes == ddp.gradients_bytes
    assert zero1.optimizer_states_bytes == ddp.optimizer_states_bytes / 4
    # every kind reduces once, after the last micro-batch: its backward (and recompute) is the reduction's window,
    # while gathers run beside every micro-batch
    from planner.evaluate_config import data_parallel_windows_s
    from planner.layer_options import OptionCost

    micro = OptionCost(compute_s=3.0, recompute_s=0.5, tp_communication_s=0.0, offload_s=0.0, activation_bytes=0,
                       working_bytes=0, local_num_params=1, backward_compute_s=2.0)
    assert data_parallel_windows_s(micro, 8) == (8 * 3.5, 2.5)


def test_even_stage_starts():
    assert even_stage_starts(10, 4) == [0, 3, 6, 8]
    assert even_stage_starts(4, 4) == [0, 1, 2, 3]


def test_infeasible_error_gives_memory_and_what_would_help():
    from planner.api import plan

    cluster = load_cluster("cpu")
    tiny = type(cluster).from_dict({**cluster.to_dict(), "device_memory_gib": 0.0001})
    with pytest.raises(InfeasiblePlanError, match=r"needs [\d.,]+ MiB per device.*more devices"):
        plan(GPT, tiny, 4)


def test_sequence_parallel_is_offered_with_and_without_a_pipeline():
    from planner.model_graph import build_model_graph
    from planner.model_spec import load_model_spec

    spec = load_model_spec(GPT, device="meta")
    pricer = ConfigPricer(spec.model, build_model_graph(spec), load_cluster("cpu"))
    block = next(i for i, layer in enumerate(pricer.layers) if layer.path == "blocks.0")
    flat_config = next(c for c in enumerate_configs(4, 8, len(pricer.layers), 8, mesh=(1, 2, 2)))
    piped_config = next(c for c in enumerate_configs(4, 8, len(pricer.layers), 8, mesh=(2, 1, 2))
                        if c.micro_batch_size == flat_config.micro_batch_size)
    flat = {p.option.label for p in pricer.priced_options(block, flat_config)}
    piped = {p.option.label for p in pricer.priced_options(block, piped_config)}
    assert "tensor+sp" in flat and "tensor+sp+ckpt-selective" in flat and piped == flat


def test_model_state_offload_is_a_zero3_option_without_a_pipeline():
    configs = enumerate_configs(4, 8, 8, 8, host_offload=True)
    offloaded = [c for c in configs if c.offload]
    assert offloaded and all(c.dp_kind == "zero3" and c.pp == 1 for c in offloaded)
    assert not any(c.offload for c in enumerate_configs(4, 8, 8, 8))
    setup = offloaded[0].data_parallel_setup()
    assert setup.offload and rank_state_bytes(1_000_000, setup).total_bytes == 0


@pytest.mark.parametrize("memory_share", [1.0, 0.7, 0.5])
def test_search_equals_exhaustive_screen_and_solve(memory_share):
    # branch and bound may skip a configuration only when it cannot win: the search's best must equal the best
    # exact solve over every configuration's screened cuts, also when memory binds (interleaved stages included)
    from planner.model_graph import build_model_graph
    from planner.model_spec import load_model_spec
    from planner.search import search_plans

    spec = load_model_spec(GPT, device="meta")
    graph = build_model_graph(spec)
    roomy = load_cluster("cpu").for_world_size(4)
    peak = search_plans(spec.model, graph, roomy, 4, spec.global_batch_size).best.peak_memory_bytes
    cluster = type(roomy).from_dict({**roomy.to_dict(), "device_memory_gib": peak * memory_share / 2**30
                                     / roomy.usable_memory_fraction})
    pricer = ConfigPricer(spec.model, graph, cluster)
    exhaustive = min((pricer.solve(s).step_time_s
                      for s in (pricer.screen(c) for c in enumerate_configs(
                          4, cluster.devices_per_node, len(graph.layers), spec.global_batch_size,
                          host_offload=cluster.host_link is not None))
                      if s.feasible), default=float("inf"))
    if exhaustive == float("inf"):
        with pytest.raises(InfeasiblePlanError):
            search_plans(spec.model, graph, cluster, 4, spec.global_batch_size)
        return
    found = search_plans(spec.model, graph, cluster, 4, spec.global_batch_size).best
    assert found.step_time_s == pytest.approx(exhaustive, rel=1e-9)
