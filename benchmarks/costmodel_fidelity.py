"""Cost-model fidelity: predicted vs measured step time and peak memory of several plans on CPU/gloo.

    PYTHONPATH=$PWD python benchmarks/costmodel_fidelity.py [--cluster cluster.yaml] [--steps 6]

Without --cluster it first runs `meshplan calibrate --nproc-per-node N` for each world size N the plans use
(4 and 2), so each calibration sees the core sharing its plans will see (4 processes on a 2-core machine
run at about half speed each), and plans each world size on its own profile. For each plan of
examples/gpt.py (dp4, dp2 x tp2, tp4 on 4 ranks, dp2 on 2 ranks, then the same with activation
checkpointing) it plans with the mesh pinned, runs it with `meshplan.execute` and prints predicted and
measured step time and peak memory per rank with the relative error, then the median absolute errors.
Plans the runtime cannot run yet are reported as "not runnable yet: <reason>" (checkpointing today).
Aims: median error <= 15 % for time, <= 10 % for memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from meshplan import execute, plan
from planner.plan_schema import PlanError

ROOT = Path(__file__).resolve().parents[1]
GPT = f"{ROOT}/examples/gpt.py:build_gpt"

# name, world size, (pp, dp, tp), checkpoint mode of the blocks
PLANS = [
    ("dp4", 4, (1, 4, 1), "none"),
    ("dp2xtp2", 4, (1, 2, 2), "none"),
    ("tp4", 4, (1, 1, 4), "none"),
    ("dp2", 2, (1, 2, 1), "none"),
    ("dp4 +ckpt full", 4, (1, 4, 1), "full"),
    ("dp2xtp2 +ckpt selective", 4, (1, 2, 2), "selective"),
]


def calibrate_profile(out: Path, nproc: int) -> None:
    command = [sys.executable, "-m", "meshplan.cli", "calibrate", "--out", str(out), "--nproc-per-node", str(nproc),
               "--name", "cpu-calibrated"]
    subprocess.run(command, check=True)


def with_checkpointing(p, mode: str):
    """The plan with every block checkpointed (when the planner does not choose it itself)."""
    if mode == "none" or any(layer.checkpoint != "none" for layer in p.layers):
        return p
    layers = [dataclasses.replace(layer, checkpoint=mode) if layer.path.startswith("blocks.") else layer
              for layer in p.layers]
    return dataclasses.replace(p, layers=layers)


def run_with_retry(p, steps: int):
    """execute(p); one retry when torchrun itself fails (gloo on an oversubscribed host sometimes aborts)."""
    try:
        return execute(p, steps=steps, quiet=True)
    except RuntimeError:
        return execute(p, steps=steps, quiet=True)


def error(predicted: float, measured: float) -> float:
    return (predicted - measured) / measured


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", help="cluster YAML to plan on (default: calibrate this machine first)")
    parser.add_argument("--steps", type=int, default=6, help="training steps per plan (first is warm-up)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="meshplan-fidelity-") as tmp:
        clusters = {}
        for world in sorted({world for _, world, _, _ in PLANS}):
            clusters[world] = args.cluster
            if args.cluster is None:
                clusters[world] = str(Path(tmp) / f"cluster-{world}.yaml")
                calibrate_profile(Path(clusters[world]), nproc=world)
        rows, time_errors, memory_errors = [], [], []
        for name, world, mesh, checkpoint in PLANS:
            p = with_checkpointing(plan(GPT, clusters[world], world, mesh=mesh), checkpoint)
            blank = f"{name:<26}{p.predicted.step_time_ms:>10.1f}{'':>18}{p.predicted.peak_memory_mib:>10.2f}{'':>18}"
            try:
                report = run_with_retry(p, args.steps)
            except PlanError as err:
                rows.append(f"{blank}  not runnable yet: {str(err)[:110]}")
                continue
            except RuntimeError as err:
                rows.append(f"{blank}  failed: {err}")
                continue
            t_err = error(report.predicted_step_time_ms, report.measured_step_time_ms)
            m_err = error(report.predicted_peak_memory_mib, report.measured_peak_memory_mib)
            time_errors.append(abs(t_err))
            memory_errors.append(abs(m_err))
            rows.append(f"{name:<26}{report.predicted_step_time_ms:>10.1f}{report.measured_step_time_ms:>10.1f}"
                        f"{t_err:>+8.0%}{report.predicted_peak_memory_mib:>10.2f}"
                        f"{report.measured_peak_memory_mib:>10.2f}{m_err:>+8.0%}")
        where = args.cluster or "a profile calibrated per world size"
        print(f"\ncost-model fidelity on {where} ({args.steps} steps per plan, examples/gpt.py)\n")
        print(f"{'plan':<26}{'time ms':>10}{'measured':>10}{'error':>8}{'mem MiB':>10}{'measured':>10}{'error':>8}")
        print("\n".join(rows))
        if time_errors:
            print(f"\nmedian |error|: step time {statistics.median(time_errors):.0%} (aim <= 15%), "
                  f"peak memory {statistics.median(memory_errors):.0%} (aim <= 10%) over {len(time_errors)} plans")
    return 0


if __name__ == "__main__":
    sys.exit(main())
