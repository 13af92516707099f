"""The examples a newcomer copies from run as documented: the Python quick start and the new-cluster walkthrough."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _run(command: list[str], cwd: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    completed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr, completed.stderr[-3000:]
    return completed.stdout


def test_quickstart_plans_saves_and_trains(tmp_path):
    out = _run([sys.executable, str(ROOT / "examples/quickstart.py"), "--world-size", "2", "--steps", "3",
                "--out", str(tmp_path / "plan.yaml")], cwd=tmp_path)
    assert yaml.safe_load((tmp_path / "plan.yaml").read_text())["world_size"] == 2
    first, last = (float(x) for x in out.split("loss ")[1].split()[0::2][:2])
    assert last < first, out  # the synthetic next-token task is learnable: three AdamW steps lower the loss
    assert "predicted" in out and "measured" in out


def test_new_cluster_walkthrough_calibrates_plans_shows_and_executes(tmp_path):
    out = _run(["bash", str(ROOT / "examples/new_cluster.sh"), str(tmp_path)], cwd=tmp_path)
    cluster = yaml.safe_load((tmp_path / "cluster.yaml").read_text())
    assert cluster["name"] == "calibrated"
    plan = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    assert plan["cluster"]["name"] == "calibrated" and plan["world_size"] == 2
    for stage in ("== 1.", "== 2.", "== 3.", "== 4.", "alternatives considered", "ran 3 steps on 2 ranks"):
        assert stage in out, out
