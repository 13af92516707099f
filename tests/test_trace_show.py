"""Traces and big plans: `meshplan show --trace` (meshplan/trace.py) writes the predicted schedule as a Chrome
trace, `meshplan execute --profile DIR` (runtime/profiling.py) a torch.profiler trace per rank, and `show` of a
16,384-rank plan fits in 120 columns and under 200 lines (every rank list shortened)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from meshplan.cli import main
from meshplan.show import format_plan
from planner.api import plan

ROOT = Path(__file__).resolve().parents[1]
GPT = f"{ROOT}/examples/gpt.py:build_gpt"


@pytest.fixture(scope="module")
def pipeline_plan():
    """The walkthrough's plan: pp2 interleaved 1F1B (4 stages per rank), 2 micro-batches, zero2."""
    return plan(GPT, "cpu", 4, mesh=(2, 2, 1))


def test_predicted_trace_has_every_action_per_pipeline_rank(pipeline_plan, tmp_path, capsys):
    pipeline_plan.save(tmp_path / "plan.yaml")
    assert main(["show", str(tmp_path / "plan.yaml"), "--trace", str(tmp_path / "predicted.json")]) == 0
    trace = json.loads((tmp_path / "predicted.json").read_text())
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    compute = [e for e in events if e["cat"] in ("forward", "backward")]
    pp, m, stages = pipeline_plan.mesh.pp, pipeline_plan.pipeline.num_microbatches, pipeline_plan.num_stages
    assert len(compute) == 2 * m * stages  # forward and backward of every micro-batch on every stage
    assert {e["pid"] for e in events} == set(range(pp))
    assert {e["pid"]: 1 for e in events if e["cat"] == "optimizer"} == dict.fromkeys(range(pp), 1)
    for rank in range(pp):  # one rank's compute never overlaps itself
        spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in compute if e["pid"] == rank)
        assert all(a[1] <= b[0] + 1e-6 for a, b in zip(spans, spans[1:], strict=False))
    end_us = max(e["ts"] + e["dur"] for e in events)
    assert end_us == pytest.approx(pipeline_plan.predicted.step_time_ms * 1000, rel=0.05)
    assert all(e["dur"] > 0 for e in compute)


def test_execute_profile_writes_one_torch_profiler_trace_per_rank(tmp_path):
    p = plan(GPT, "cpu", 2, mesh=(1, 2, 1))
    p.save(tmp_path / "plan.yaml")
    done = subprocess.run([sys.executable, "-m", "meshplan.cli", "execute", str(tmp_path / "plan.yaml"), "--steps",
                           "2", "--quiet", "--profile", str(tmp_path / "prof")], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OMP_NUM_THREADS" not in done.stderr  # torchrun's banner: execute sets it for the ranks
    assert "LeafSpec" not in done.stderr  # runtime/quiet.py
    for rank in range(2):
        trace = json.loads((tmp_path / "prof" / f"rank{rank}.json").read_text())
        names = [e.get("name", "") for e in trace["traceEvents"]]
        assert "meshplan step 1" in names  # the last step, wrapped in a record_function
        assert any("aten::mm" in n or "aten::addmm" in n for n in names)
        assert trace["distributedInfo"]["rank"] == rank


def test_show_of_a_16384_rank_plan_fits_the_screen(pipeline_plan):
    big = copy.deepcopy(pipeline_plan)
    big.mesh.pp, big.mesh.dp, big.mesh.tp = 2, 1024, 8
    big.world_size = 16384
    big.model.global_batch_size = 4096
    big.data_parallel.replicate = 8
    big.layers[3].strategy, big.layers[3].tp_rows = "tensor2d", 2
    text = format_plan(big)
    lines = text.splitlines()
    assert len(lines) < 200 and max(len(line) for line in lines) <= 120, max(lines, key=len)
    assert "... (16384 groups)" not in text  # size-1 axes are never listed
    assert "[0,8,..,8184]" in text  # a dp group of 1,024 ranks strided by tp
