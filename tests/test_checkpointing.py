"""Checkpoints (torch.distributed.checkpoint) on CPU/gloo: resuming gives the losses of an uninterrupted run.

One torchrun launch of 4 ranks (tests/checkpoint_worker.py) runs every scenario in float64 through the runtime's
own `run_rank`: a dp4 zero3 run saved every step, resumed into dp4 zero3 past a half-written checkpoint, and
into dp2 x tp2 zero3, ddp dp4, pp2 x dp2 (1f1b; zero3, ddp and zero1 stages), zero1 dp4, ddp dp2 x tp2 and
tp4-as-2x2 (tensor2d) zero3 and ddp plans; the pipelines', zero1's, ddp + tp's and the tensor2d plans' own
checkpoints back into dp4 zero3.
Resumed losses must equal the uninterrupted run's within 1e-9 relative: resharding is exact and only summation
order differs between meshes, so anything larger means state was lost (a missing AdamW moment or step count
shows up as ~1e-3).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_parity import force_tensor_2d
from test_parity_dp_memory import make_plan
from test_pipeline_parity import GPT, TWO_STAGES, pipeline_plan, with_kind

from meshplan import execute
from planner.api import plan
from planner.plan_schema import PlanError
from runtime.checkpointing import (
    check_checkpoint_matches,
    latest_checkpoint,
    read_checkpoint_meta,
    resume_step,
)

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-9


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("checkpoints")
    plans = {"zero3": make_plan((1, 4, 1)), "tp": make_plan((1, 2, 2)), "ddp": make_plan((1, 4, 1), kind="ddp"),
             "pp": pipeline_plan(GPT, 2, 2, 1, "1f1b", 2, TWO_STAGES), "zero1": make_plan((1, 4, 1), kind="zero1"),
             "ddp_tp": make_plan((1, 2, 2), kind="ddp"), "tp2d": force_tensor_2d(make_plan((1, 1, 4)), 2),
             "ddp_tp2d": force_tensor_2d(make_plan((1, 1, 4), kind="ddp"), 2),
             "pp_ddp": with_kind("ddp")(pipeline_plan(GPT, 2, 2, 1, "1f1b", 2, TWO_STAGES)),
             "pp_zero1": with_kind("zero1")(pipeline_plan(GPT, 2, 2, 1, "1f1b", 2, TWO_STAGES))}
    files = []
    for name, plan_obj in plans.items():
        files.append(tmp / f"{name}.yaml")
        plan_obj.save(files[-1])
    work = tmp / "work"
    work.mkdir()
    out = tmp / "out.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
               str(ROOT / "tests" / "checkpoint_worker.py"), str(out), str(work), "float64", *map(str, files)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-6000:]
    return json.loads(out.read_text()), work, plans


def assert_losses_equal(got: list[float], expected: list[float]) -> None:
    assert len(got) == len(expected), (got, expected)
    assert got == pytest.approx(expected, rel=TOLERANCE, abs=0), (got, expected)


def test_saving_keeps_the_last_two_and_does_not_change_training(scenarios):
    results, _, _ = scenarios
    assert_losses_equal(results["saved"], results["full"][:4])
    assert results["saved_listing"] == ["latest", "step-000003", "step-000004"]


def test_resume_after_a_crash_mid_write_uses_the_previous_checkpoint(scenarios):
    """step-000004.tmp (a crash before DCP's metadata) is ignored: the run resumes at step 3 and its losses for
    steps 3 and 4 are the uninterrupted run's; its own save then clears the leftover."""
    results, _, _ = scenarios
    assert_losses_equal(results["crashed"], results["full"][3:5])
    assert results["crashed_listing"] == ["latest", "step-000003", "step-000005"]  # the save removed the .tmp


@pytest.mark.parametrize("target", ["tp", "ddp", "pp", "zero1", "ddp_tp", "tp2d", "ddp_tp2d", "pp_ddp", "pp_zero1"],
                         ids=["dp2xtp2_zero3", "dp4_ddp", "pp2xdp2_zero3", "dp4_zero1", "dp2xtp2_ddp",
                              "tp2x2_zero3", "tp2x2_ddp", "pp2xdp2_ddp", "pp2xdp2_zero1"])
def test_resume_into_another_mesh_continues_the_same_run(scenarios, target):
    """A dp4 zero3 checkpoint of step 4 resumed under another mesh: DCP reshards; losses of steps 4-5 match."""
    results, _, _ = scenarios
    assert_losses_equal(results[target], results["full"][4:6])


def test_pipeline_checkpoint_resumes_without_pipeline(scenarios):
    """Stage modules save under the original FQNs (the ModuleList index dropped), so dp4 zero3 reads them."""
    results, _, _ = scenarios
    assert results["pp_checkpoint"]["mesh"] == [2, 2, 1] and results["pp_checkpoint"]["step"] == 6
    assert_losses_equal(results["from_pp"], results["full"][6:7])


@pytest.mark.parametrize("source", ["zero1", "ddp_tp", "tp2d", "ddp_tp2d", "pp_ddp", "pp_zero1"])
def test_zero1_and_ddp_tp_checkpoints_resume_into_zero3(scenarios, source):
    """zero1 (each rank saves its ZeroRedundancyOptimizer partition) and ddp + tp (tensor-parallel shards saved as
    DTensors) write get_state_dict's layout: their step-6 checkpoints continue the run under dp4 zero3; so do
    tensor2d plans' (shards of a 2 x 2 grid) under zero3 and ddp, and pp2 x dp2 pipelines with ddp and zero1
    stages (each stage's dp group saves its ZeroRedundancyOptimizer partitions)."""
    results, _, _ = scenarios
    assert_losses_equal(results[f"from_{source}"], results["full"][6:7])


def test_checkpoint_of_another_model_is_refused(scenarios):
    results, work, plans = scenarios
    path = latest_checkpoint(work / "saved")
    other = plan(f"{ROOT}/tests/models.py:build_mlp", "cpu", 4, mesh=(1, 4, 1))
    with pytest.raises(PlanError, match="different model") as err:
        check_checkpoint_matches(read_checkpoint_meta(path), other, path)
    assert plans["zero3"].model.fingerprint in str(err.value) and other.model.fingerprint in str(err.value)
    check_checkpoint_matches(read_checkpoint_meta(path), plans["zero3"], path)  # its own model: accepted
    with pytest.raises(PlanError, match="asks for no more"):
        resume_step(work / "saved", plans["zero3"], 4)  # saved at step 4: nothing left to run


def test_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for name, complete in (("step-000002", True), ("step-000004", True), ("step-000006.tmp", True),
                           ("step-000008", False)):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / "meshplan.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000004"  # no pointer: newest complete, .tmp ignored
    (tmp_path / "latest").write_text("step-000002\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000002"


def test_resume_without_a_directory_is_refused_before_launch():
    with pytest.raises(PlanError, match="need checkpoint_dir"):
        execute(make_plan((1, 4, 1)), steps=2, resume=True)


def test_execute_saves_and_resumes_through_the_command_line(scenarios, tmp_path):
    """`execute(checkpoint_dir=..., checkpoint_every=..., resume=...)` hands the flags to `meshplan execute` in
    torchrun (float32): 3 steps saved at step 2 and at the end; with step 3 deleted (`latest` now names a missing
    directory) resume falls back to step 2 and reproduces step 2's loss (1e-6: same code, same dtype)."""
    _, _, plans = scenarios
    directory = tmp_path / "ckpt"
    first = execute(plans["zero3"], steps=3, checkpoint_dir=directory, checkpoint_every=2, quiet=True)
    assert sorted(p.name for p in directory.iterdir()) == ["latest", "step-000002", "step-000003"]
    shutil.rmtree(directory / "step-000003")
    resumed = execute(plans["zero3"], steps=3, checkpoint_dir=directory, resume=True, quiet=True)
    assert resumed.ranks[0].first_step == 2 and len(resumed.losses) == 1
    assert resumed.losses[0] == pytest.approx(first.losses[2], rel=1e-6)
    assert (directory / "latest").read_text().strip() == "step-000003"
