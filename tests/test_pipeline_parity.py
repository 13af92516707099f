"""Pipeline parallelism numerics on CPU/gloo: pipeline plans match a single process of the same model.

The planner does not search pipeline meshes yet, so each plan is edited as a person would: a pp = 1 plan
for dp x tp ranks gets mesh.pp, a schedule, micro-batches and layer stages. One torchrun launch per world size
runs all its plans (start-up dominates), 3 AdamW steps each, comparing at every step the global-batch loss and
every gradient each rank holds, and every parameter at the end (relative error of the difference's norm, per
tensor, worst over ranks):
- float64: within 1e-9. Micro-batching only changes summation order (mean of micro-batch means vs one mean),
  so anything larger is a bug; a wrong gradient scale shows up as O(1).
- float32: loss within 1e-5, gradients and parameters within 1e-3 (LayerNorm-bias gradients are sums of
  nearly cancelling terms; see test_parity.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_parity import force_tensor_parallel

from planner.api import plan
from planner.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
GPT = f"{ROOT}/examples/gpt.py:build_gpt"
TOLERANCE = {"float64": {"loss": 1e-9, "grad": 1e-9, "param": 1e-9},
             "float32": {"loss": 1e-5, "grad": 1e-3, "param": 1e-3}}
STEPS = 3
# GPT's chain: wte, wpe, blocks.0-3, ln_f, head. First layer of each stage after stage 0:
TWO_STAGES = ("blocks.2",)
FOUR_STAGES = ("blocks.1", "blocks.2", "blocks.3")


def pipeline_plan(model: str, pp: int, dp: int, tp: int, schedule: str, num_microbatches: int,
                  stage_starts: tuple[str, ...]) -> Plan:
    """A plan for pp x dp x tp ranks: the planner's dp x tp plan with a pipeline edited in."""
    result = plan(model, "cpu", dp * tp, mesh=(1, dp, tp))
    if tp > 1:
        result = force_tensor_parallel(result)
    result.world_size = pp * dp * tp
    result.mesh.pp = pp
    result.pipeline.schedule = schedule
    result.pipeline.num_microbatches = num_microbatches
    result.pipeline.virtual_stages = (len(stage_starts) + 1) // pp if schedule == "interleaved_1f1b" else 1
    stage = 0
    for layer in result.layers:
        stage += layer.path in stage_starts
        layer.stage = stage
    result.validate("test")
    return result


def run_pipeline_parity(plans: dict[str, Plan], tmp_path: Path, dtype: str) -> dict:
    world_sizes = {p.world_size for p in plans.values()}
    assert len(world_sizes) == 1, world_sizes
    files = []
    for name, plan_obj in plans.items():
        files.append(tmp_path / f"{name}.yaml")
        plan_obj.save(files[-1])
    out = tmp_path / "parity.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={world_sizes.pop()}", str(ROOT / "tests" / "pipeline_parity_worker.py"),
               str(out), str(STEPS), dtype, *map(str, files)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-6000:]
    return json.loads(out.read_text())


def check(result: dict, dtype: str) -> None:
    assert not result["missing"], f"no rank holds {result['missing']}"
    assert not result["kept_elsewhere"], f"ranks keep parameters of other stages: {result['kept_elsewhere']}"
    for quantity, tolerance in TOLERANCE[dtype].items():
        assert result["worst"][quantity] < tolerance, (quantity, result)


WORLD_2 = {
    "pp2_1f1b": dict(pp=2, dp=1, tp=1, schedule="1f1b", num_microbatches=4, stage_starts=TWO_STAGES),
    "pp2_gpipe": dict(pp=2, dp=1, tp=1, schedule="gpipe", num_microbatches=2, stage_starts=TWO_STAGES),
    "pp2_interleaved": dict(pp=2, dp=1, tp=1, schedule="interleaved_1f1b", num_microbatches=4,
                            stage_starts=FOUR_STAGES),
}
WORLD_4 = {
    "pp2xtp2_1f1b": dict(pp=2, dp=1, tp=2, schedule="1f1b", num_microbatches=2, stage_starts=TWO_STAGES),
    "pp2xdp2_1f1b": dict(pp=2, dp=2, tp=1, schedule="1f1b", num_microbatches=2, stage_starts=TWO_STAGES),
}


@pytest.fixture(scope="module")
def world_2_results(tmp_path_factory):
    plans = {name: pipeline_plan(GPT, **config) for name, config in WORLD_2.items()}
    return run_pipeline_parity(plans, tmp_path_factory.mktemp("pp_world2"), "float64")


@pytest.fixture(scope="module")
def world_4_results(tmp_path_factory):
    plans = {name: pipeline_plan(GPT, **config) for name, config in WORLD_4.items()}
    return run_pipeline_parity(plans, tmp_path_factory.mktemp("pp_world4"), "float64")


@pytest.mark.parametrize("name", list(WORLD_2))
def test_pipeline_on_two_ranks_matches_single_process(name, world_2_results):
    check(world_2_results[name], "float64")


@pytest.mark.parametrize("name", list(WORLD_4))
def test_pipeline_with_tp_or_dp_matches_single_process(name, world_4_results):
    check(world_4_results[name], "float64")
