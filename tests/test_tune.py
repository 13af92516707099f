"""`meshplan calibrate --from-runs`: a real 2-rank run's report goes through the CLI; the fit recovers a known step
scale from reports whose measurements were made from it; bad inputs are refused with exit 2.

One launch only (2 gloo ranks, examples/gpt.py, 3 steps). The known-answer fit uses copies of that report
with other plans and measured step times computed from a known StepScale, so nothing asserts on timing.
"""

import dataclasses
import functools
import json
import math
import os
from pathlib import Path

import pytest

from costmodel import StepScale, load_cluster
from meshplan.cli import main
from meshplan.tune import Pricer, load_run
from planner.api import plan
from runtime.execute import execute
from runtime.train import MEASURE_MACHINE_ENV

ROOT = Path(__file__).resolve().parents[1]
GPT = f"{ROOT}/examples/gpt.py:build_gpt"
TRUE_SCALE = StepScale(compute=2.0, host_overhead=3.0, communication=1.5, optimizer=1.0)


@functools.cache
def pinned_plan(mesh: tuple[int, int, int]):
    return plan(GPT, "cpu", 2, mesh=mesh)


@pytest.fixture(scope="module")
def real_report(tmp_path_factory) -> Path:
    """One real run: dp2 on 2 CPU ranks, 3 steps; the report carries the plan and the machine measured in it."""
    path = tmp_path_factory.mktemp("runs") / "dp2.json"
    saved = os.environ.get(MEASURE_MACHINE_ENV)
    os.environ[MEASURE_MACHINE_ENV] = "1"  # tests/conftest.py switches it off for the other tests
    try:
        execute(pinned_plan((1, 2, 1)), steps=3, report_path=path, quiet=True)
    finally:
        if saved is None:
            os.environ.pop(MEASURE_MACHINE_ENV)
        else:
            os.environ[MEASURE_MACHINE_ENV] = saved
    return path


@pytest.fixture(scope="module")
def pricer(real_report) -> Pricer:
    return Pricer([load_run(str(real_report))])  # one trace of the model for every re-cost below


def synthetic_report(real: Path, out: Path, mesh: tuple[int, int, int], pricer: Pricer) -> float:
    """A copy of `real` for the plan of `mesh`, 'measured' as the cpu preset with TRUE_SCALE prices it; returns
    that time (ms)."""
    data = json.loads(real.read_text())
    data["plan_yaml"] = pinned_plan(mesh).to_yaml()
    data["mesh"] = {"pp": mesh[0], "dp": mesh[1], "tp": mesh[2]}
    data["ranks"][0]["machine_profile"] = data["ranks"][0]["machine_profile_before"] = None
    out.write_text(json.dumps(data))
    run = load_run(str(out))
    truth = dataclasses.replace(load_cluster("cpu"), step_scale=TRUE_SCALE)
    measured = pricer.step_ms(run, truth)
    data["measured_step_time_ms"] = measured
    out.write_text(json.dumps(data))
    return measured


def test_report_records_the_plan_and_the_machine_and_from_runs_reads_it(real_report, tmp_path, capsys):
    data = json.loads(real_report.read_text())
    assert data["plan_yaml"] and data["model_fingerprint"]
    for key in ("machine_profile_before", "machine_profile"):  # before and after the timed steps
        machine = data["ranks"][0][key]
        assert machine["device_type"] == "cpu" and machine["kernel_overhead_us"] > 0
    assert data["machine_step_time_ms"] > 0  # the plan re-costed on the machine measured in the run
    out = tmp_path / "tuned.yaml"
    assert main(["calibrate", "--from-runs", str(real_report), "--cluster", "cpu", "--out", str(out),
                 "--on-measured-machine"]) == 0
    printed = capsys.readouterr().out
    assert "before" in printed and "leave-one-out" in printed and f"wrote {out}" in printed
    tuned = load_cluster(out)
    assert "dp2.json" in tuned.description and "from-runs" in tuned.description


def test_fit_recovers_a_known_scale_and_improves_a_third_plan(real_report, pricer, tmp_path, capsys):
    fit_a = tmp_path / "dp2.json"
    fit_b = tmp_path / "tp2.json"
    third = tmp_path / "pp2.json"
    synthetic_report(real_report, fit_a, (1, 2, 1), pricer)
    synthetic_report(real_report, fit_b, (1, 1, 2), pricer)
    measured = synthetic_report(real_report, third, (2, 1, 1), pricer)
    out = tmp_path / "tuned.yaml"
    assert main(["calibrate", "--from-runs", str(fit_a), str(fit_b), "--cluster", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("%") >= 6  # before, after and held-out error of each run
    run = load_run(str(third))
    before = abs(pricer.step_ms(run, load_cluster("cpu").for_world_size(2)) - measured) / measured
    after = abs(pricer.step_ms(run, load_cluster(out).for_world_size(2)) - measured) / measured
    assert before > 0.3 and after < before / 3


def test_refuses_other_models_other_cluster_shapes_and_non_reports(real_report, tmp_path, capsys):
    other = tmp_path / "other.json"
    data = json.loads(real_report.read_text())
    data["plan_yaml"] = data["plan_yaml"].replace(data["model_fingerprint"], "0" * len(data["model_fingerprint"]))
    other.write_text(json.dumps(data))
    out = str(tmp_path / "x.yaml")
    assert main(["calibrate", "--from-runs", str(real_report), str(other), "--cluster", "cpu", "--out", out]) == 2
    assert "different models" in capsys.readouterr().err
    assert main(["calibrate", "--from-runs", str(real_report), "--cluster", "a100-80g", "--out", out]) == 2
    assert "cluster shape" in capsys.readouterr().err
    junk = tmp_path / "junk.json"
    junk.write_text("not json")
    assert main(["calibrate", "--from-runs", str(junk), "--cluster", "cpu", "--out", out]) == 2
    assert "not a run report" in capsys.readouterr().err
    assert main(["calibrate", "--from-runs", str(real_report), "--out", out]) == 2
    assert "--cluster" in capsys.readouterr().err
    assert not math.isnan(load_run(str(real_report)).measured_ms)
