"""Run under torchrun: count FSDP2 parameter all-gathers per FSDP group and optimizer step for each plan.

    torchrun --nproc-per-node=N tests/fsdp_gather_worker.py out.json plan1.yaml [plan2.yaml ...]

The count comes from FSDP2 itself: every call of its `foreach_all_gather` (one per group unshard) is recorded
with the group's parameter list. A plan runs 1 step and then 3 steps from scratch; the difference over the 2
extra steps excludes what the first step does once (pipeline shape inference, lazy init). Rank 0 writes, per
plan, the gathers per step of every group it runs.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import torch.distributed as dist
import torch.distributed.fsdp._fully_shard._fsdp_param_group as fsdp_param_group

from planner.plan import Plan
from runtime.train import run_rank

calls: Counter = Counter()
_foreach_all_gather = fsdp_param_group.foreach_all_gather


def _counting_all_gather(fsdp_params, *args, **kwargs):
    calls[tuple(p._param_fqn for p in fsdp_params)] += 1
    return _foreach_all_gather(fsdp_params, *args, **kwargs)


fsdp_param_group.foreach_all_gather = _counting_all_gather


def gathers_per_step(plan: Plan) -> dict[str, float]:
    counts = []
    for steps in (1, 3):
        calls.clear()
        run_rank(plan, steps)
        counts.append(Counter(calls))
    return {",".join(group): (counts[1][group] - counts[0][group]) / 2 for group in counts[1]}


def main() -> None:
    out, paths = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")
    results = {path: gathers_per_step(Plan.load(path)) for path in paths}
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
