"""`meshplan calibrate`: the alpha-beta fit, and a real 2-process gloo run whose profile a plan then uses."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from costmodel import load_cluster
from costmodel.calibrate import fit_alpha_beta
from planner.api import plan

ROOT = Path(__file__).resolve().parents[1]
GPT = f"{ROOT}/examples/gpt.py:build_gpt"


@pytest.mark.parametrize(("collective", "steps", "volume"), [("all_reduce", 2, 2.0), ("all_gather", 1, 1.0),
                                                             ("reduce_scatter", 1, 1.0)])
def test_fit_recovers_alpha_and_bus_bandwidth(collective, steps, volume):
    n, alpha, bandwidth = 4, 20e-6, 5e9
    sizes = [4e3, 6.4e4, 1e6, 8e6]
    times = [steps * (n - 1) * alpha + volume * (n - 1) / n * m / bandwidth for m in sizes]
    fit = fit_alpha_beta(collective, n, sizes, times)
    assert fit.link.latency_s == pytest.approx(alpha, rel=1e-6)
    assert fit.link.bandwidth_bytes_per_s == pytest.approx(bandwidth, rel=1e-6)


def test_fit_is_robust_to_noise():
    # a flat line falls back to the largest message's rate; a negative intercept to the smallest message
    flat = fit_alpha_beta("all_gather", 2, [1e3, 1e6], [1e-3, 1e-3])
    assert 0 < flat.link.bandwidth_bytes_per_s < float("inf") and flat.link.latency_s > 0
    negative = fit_alpha_beta("all_reduce", 2, [1e3, 1e6, 2e6], [1e-6, 1e-3, 2.1e-3])
    assert negative.intercept_s < 0
    assert 0 < negative.link.latency_s * 2 <= 1e-6


def test_calibrate_writes_a_profile_that_plans_use(tmp_path):
    out = tmp_path / "cluster.yaml"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    completed = subprocess.run(
        [sys.executable, "-m", "meshplan.cli", "calibrate", "--out", str(out), "--quick", "--nproc-per-node", "2",
         "--name", "ci-cpu", "--progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    print(completed.stdout)  # the summary table, shown by pytest when an assertion below fails
    assert "calibrate [" in completed.stderr  # the progress bar, forced by --progress (stderr is a pipe)
    assert "intra_node all_reduce" in completed.stdout and f"wrote {out}" in completed.stdout
    cluster = load_cluster(out)
    base = load_cluster("cpu")
    assert cluster.name == "ci-cpu" and cluster.device_type == "cpu" and cluster.backend == "gloo"
    assert cluster.kernel_overhead_s > 0 and cluster.optimizer_tensor_overhead_s > 0
    assert cluster.dtensor_op_overhead_s > cluster.kernel_overhead_s  # DTensor dispatch costs more than a plain op
    assert cluster.memory_bandwidth_bytes_per_s != base.memory_bandwidth_bytes_per_s
    assert len(cluster.matmul_efficiency["float32"].points) == 3
    assert cluster.intra_node != base.intra_node and cluster.intra_node.latency_s > 0
    assert set(cluster.collective_links["intra_node"]) == {"all_gather", "reduce_scatter"}
    assert cluster.overlap == base.overlap and cluster.inter_node == base.inter_node
    assert cluster.host_link is not None
    result = plan(GPT, str(out), 2)
    assert result.cluster["name"] == "ci-cpu"
    assert result.cluster["kernel_overhead_us"] == pytest.approx(cluster.kernel_overhead_s * 1e6)
    assert result.predicted.step_time_ms > 0


def test_calibrate_refuses_a_bad_base(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "meshplan.cli", "calibrate", "--out", str(tmp_path / "c.yaml"), "--base", "h900"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert "unknown cluster preset 'h900'" in completed.stderr
