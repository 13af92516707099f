"""Quick start from Python: plan a small GPT for 4 ranks, save and reload the plan, train it on 4 CPU processes.

    python examples/quickstart.py [--world-size 4] [--steps 5] [--out plan.yaml]

The same as `meshplan plan examples/gpt.py:build_gpt --cluster cpu --world-size 4 && meshplan execute plan.yaml`,
written with the Python API so that it can be copied into a script or a notebook.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from meshplan import Plan, execute, plan

MODEL = f"{Path(__file__).with_name('gpt.py')}:build_gpt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default="plan.yaml")
    args = parser.parse_args()

    chosen = plan(MODEL, cluster="cpu", world_size=args.world_size)
    chosen.save(args.out)
    reloaded = Plan.load(args.out)  # what `meshplan execute plan.yaml` reads; edit the YAML in between if you like
    mesh = reloaded.mesh
    print(f"plan: pp={mesh.pp} x dp={mesh.dp} x tp={mesh.tp}, {reloaded.data_parallel.kind}, "
          f"predicted {reloaded.predicted.step_time_ms:.2f} ms per step and "
          f"{reloaded.predicted.peak_memory_mib:.2f} MiB per device (written to {args.out})")

    report = execute(args.out, steps=args.steps, quiet=True)
    print(f"trained {args.steps} steps: loss {report.losses[0]:.4f} -> {report.losses[-1]:.4f}")
    print(report.format())


if __name__ == "__main__":
    main()
