"""Runs that die or hang end in a clean recovery or a clear message (2 gloo ranks, tests/failure_models.py's MLP).

- A rank killed mid-run under `--max-restarts 1`: torchrun restarts the group, which resumes from the latest
  checkpoint by itself; its losses equal an uninterrupted run's exactly (tolerance 0: same code, same mesh, same
  dtype, and the checkpoint restores parameters, AdamW state and RNG bit for bit), and at most the checkpoint
  interval is redone.
- A rank killed between the DCP write and the rename of a checkpoint: `latest` still names the previous one,
  which the restarted group loads; same losses.
- A rank that stalls: its peers wait in a collective; the watchdog ends the job within --timeout-s plus a margin,
  naming the rank and the step, and the command exits 1 without a traceback.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshplan import execute
from planner.api import plan
from runtime.execute import RunFailedError
from runtime.watchdog import SETUP_STEP, Progress, explain_hang

ROOT = Path(__file__).resolve().parents[1]
MODEL = f"{ROOT}/tests/failure_models.py:build_faulty_mlp"
STEPS, EVERY = 6, 2


@pytest.fixture(scope="module")
def faulty_plan(tmp_path_factory):
    plan_obj = plan(MODEL, "cpu", 2, mesh=(1, 2, 1))
    plan_obj.data_parallel.kind, plan_obj.data_parallel.offload = "zero3", False
    path = tmp_path_factory.mktemp("failures") / "plan.yaml"
    plan_obj.save(path)
    return path


@pytest.fixture(scope="module")
def uninterrupted(faulty_plan, tmp_path_factory):
    """Losses of all STEPS steps without a fault (checkpointing as in the faulty runs)."""
    directory = tmp_path_factory.mktemp("uninterrupted")
    return execute(faulty_plan, steps=STEPS, checkpoint_dir=directory, checkpoint_every=EVERY, quiet=True).losses


def test_killed_rank_restarts_and_resumes_from_the_last_checkpoint(faulty_plan, uninterrupted, tmp_path,
                                                                  monkeypatch, capfd):
    kill_step = 3
    monkeypatch.setenv("MESHPLAN_TEST_KILL", f"1:{kill_step}")
    report = execute(faulty_plan, steps=STEPS, checkpoint_dir=tmp_path, checkpoint_every=EVERY, max_restarts=1,
                     quiet=True)
    first = report.ranks[0].first_step
    assert first == 2 and kill_step - first <= EVERY  # resumed from step-000002: one step redone
    assert report.losses == uninterrupted[first:]  # exactly
    assert "restart 1: resuming from" in capfd.readouterr().err


def test_killed_rank_without_restarts_fails_cleanly_and_keeps_the_checkpoints(faulty_plan, tmp_path, monkeypatch):
    monkeypatch.setenv("MESHPLAN_TEST_KILL", "0:3")
    with pytest.raises(RunFailedError, match="rank 0 was killed by signal SIGKILL"):
        execute(faulty_plan, steps=STEPS, checkpoint_dir=tmp_path, checkpoint_every=EVERY, quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000002"]


def test_kill_during_a_checkpoint_write_keeps_the_previous_one_loadable(faulty_plan, uninterrupted, tmp_path):
    """Rank 1 dies after writing its shards of step-000004.tmp, before the rename: the restarted group finds
    `latest` at step-000002 beside the partial step-000004.tmp, resumes from step 2 and matches exactly."""
    directory, state, report = tmp_path / "ckpt", tmp_path / "state.json", tmp_path / "report.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "--max-restarts=1", str(ROOT / "tests" / "crash_worker.py"), "1", "4", str(state), str(faulty_plan),
               "--steps", str(STEPS), "--checkpoint-dir", str(directory), "--checkpoint-every", str(EVERY),
               "--report-json", str(report), "--quiet"]
    done = subprocess.run(command, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    crash = json.loads(state.read_text())
    assert crash == {"listing": ["latest", "step-000002", "step-000004.tmp"], "latest": "step-000002"}
    result = json.loads(report.read_text())
    assert result["ranks"][0]["first_step"] == 2
    assert result["losses"] == uninterrupted[2:]
    assert sorted(p.name for p in directory.iterdir()) == ["latest", "step-000004", "step-000006"]


def test_stalled_rank_is_reported_with_its_rank_and_step(faulty_plan):
    timeout_s = 5
    env = dict(os.environ, PYTHONPATH=str(ROOT), MESHPLAN_TEST_STALL="1:2")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "meshplan.cli", "execute", str(faulty_plan), "--steps", "4",
                           "--timeout-s", str(timeout_s), "--quiet"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    elapsed_s = time.monotonic() - start
    assert done.returncode == 1, done.stderr[-4000:]
    assert "hang detected" in done.stderr
    assert "rank(s) 1 stopped answering at step 2 (data)" in done.stderr, done.stderr[-4000:]
    assert "exited with status 3: its watchdog detected a hang" in done.stderr
    assert "Traceback" not in done.stderr
    stalls_s = [float(m) for m in re.findall(r"made no progress for ([\d.]+) s", done.stderr)]
    assert stalls_s and all(timeout_s <= s < timeout_s + 2 for s in stalls_s), stalls_s  # detected on time
    # start-up (imports, rendezvous, model build: ~10-30 s on 2 loaded cores) + the timeout + teardown
    assert elapsed_s < timeout_s + 90, elapsed_s


def test_hang_message_names_the_rank_behind_a_silent_rank_or_a_shared_collective():
    """explain_hang's three verdicts, from published progress (no process group needed)."""
    me = Progress(0, 7, "loss all-reduce")
    behind = explain_hang(me, 31.0, 30, [me, Progress(1, 7, "step"), Progress(2, 7, "loss all-reduce")], 3)
    assert "rank 0 at step 7 (loss all-reduce) made no progress for 31.0 s (--timeout-s 30)" in behind
    assert "rank(s) 1 stopped answering at step 7 (step)" in behind
    silent = explain_hang(me, 31.0, 30, [me, Progress(1, 6, "checkpoint", heartbeat_age_s=45.0)], 3)
    assert "rank(s) 1, 2 stopped answering at step 6" in silent and "last heartbeat 45.0 s ago" in silent
    shared = explain_hang(me, 31.0, 30, [me, Progress(1, 7, "loss all-reduce")], 2)
    assert "every rank waits at step 7 (loss all-reduce)" in shared and "mismatched collectives" in shared
    setup = explain_hang(Progress(0, SETUP_STEP, "build"), 31.0, 30, [Progress(0, SETUP_STEP, "build")], 2)
    assert "rank 0 at setup (build)" in setup and "rank(s) 1 stopped answering before publishing" in setup
