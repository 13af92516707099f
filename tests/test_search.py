"""The search space and the formulas the search relies on: configurations, pipeline schedules, data-parallel
state memory, and what the search reports."""

from pathlib import Path

import pytest

from costmodel import load_cluster
from planner.config_space import enumerate_configs
from planner.data_parallel_costs import DataParallelSetup, rank_state_bytes
from planner.evaluate_config import even_stage_starts
from planner.pipeline_schedule import in_flight_microbatches, pipeline_step_factor
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


def test_in_flight_micro_batches_and_bubble_follow_the_published_schedules():
    # GPipe holds every micro-batch; 1F1B stage s holds pp - s (Narayanan et al. 2021, PipeDream-Flush)
    assert [in_flight_microbatches("gpipe", 4, s, 8) for s in range(4)] == [8, 8, 8, 8]
    assert [in_flight_microbatches("1f1b", 4, s, 8) for s in range(4)] == [4, 3, 2, 1]
    assert in_flight_microbatches("1f1b", 4, 0, 2) == 2
    # interleaved: rank 0 of pp=4, v=2 warms up 2 * 3 + 1 * 4 = 10 chunks, holds 11 of 1/2 its layers each
    assert in_flight_microbatches("interleaved_1f1b", 4, 0, 8, 2) == pytest.approx(11 / 2)
    assert in_flight_microbatches("interleaved_1f1b", 4, 4, 8, 2) == pytest.approx(11 / 2)  # same rank
    # bubble fraction (pp - 1) / (m + pp - 1), divided by v when interleaved
    assert pipeline_step_factor(4, 8) == 11
    assert pipeline_step_factor(4, 8, 2) == pytest.approx(9.5)
    assert pipeline_step_factor(1, 8) == 8


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


def test_even_stage_starts():
    assert even_stage_starts(10, 4) == [0, 3, 6, 8]
    assert even_stage_starts(4, 4) == [0, 1, 2, 3]


def test_infeasible_error_gives_memory_and_what_would_help():
    from planner.api import plan

    cluster = load_cluster("cpu")
    tiny = type(cluster).from_dict({**cluster.to_dict(), "device_memory_gib": 0.0001})
    with pytest.raises(InfeasiblePlanError, match=r"needs [\d.,]+ MiB per device.*more devices"):
        plan(GPT, tiny, 4)
