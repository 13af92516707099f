"""How fast the planner plans big models on big clusters, on this machine (no weights are ever allocated).

    python benchmarks/planner_scale.py [--repeats 3]

Prints, per case: wall time of the first plan() in this process (includes one-time torch imports), the median
of the following repeats, the process's peak resident memory, and the chosen configuration.
Aims (issue 4): GPT-3 175B on 128 x 8 A100-80GB <= 10 s median and <= 4 GB peak; 1.3B on one node <= 2 s.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from meshplan import plan  # noqa: E402

CASES = [
    ("GPT-3 175B, 128 x 8 A100-80GB", "benchmarks/models.py:gpt3_175b", "a100-80g", 1024),
    ("Llama-style 70B, 32 x 8 H100", "benchmarks/models.py:llama_70b", "h100", 256),
    ("GPT 1.3B, 1 x 8 A100-80GB", "benchmarks/models.py:gpt_1_3b", "a100-80g", 8),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{'case':<34}{'first (s)':>10}{'median (s)':>11}{'peak RSS (GB)':>14}  plan")
    for name, source, cluster, world in CASES:
        try:
            times = []
            for _ in range(1 + args.repeats):
                start = time.perf_counter()
                result = plan(str(ROOT / source), cluster, world, param_dtype="bfloat16")
                times.append(time.perf_counter() - start)
        except Exception as err:  # a missing preset must not hide the other cases' figures
            print(f"{name:<34}  failed: {type(err).__name__}: {err}")
            continue
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        p = result.predicted
        chosen = (f"pp{result.mesh.pp} dp{result.mesh.dp} tp{result.mesh.tp} {result.data_parallel.kind} "
                  f"{result.pipeline.schedule} m={result.pipeline.num_microbatches}; "
                  f"step {p.step_time_ms / 1e3:.2f} s, "
                  f"{p.peak_memory_mib / 1024:.1f} of {p.memory_limit_mib / 1024:.1f} GiB")
        median = statistics.median(times[1:]) if len(times) > 1 else float("nan")
        print(f"{name:<34}{times[0]:>10.2f}{median:>11.2f}{peak_gb:>14.2f}  {chosen}", flush=True)


if __name__ == "__main__":
    main()
