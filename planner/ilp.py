"""Choose one strategy per layer kind: minimum total time subject to per-device memory, as a PuLP ILP.

Legend
    x[k, s] in {0, 1}  layer kind k uses strategy s (every layer of a kind shares the choice)
    n[k]               number of layers of kind k
    t[k, s], m[k, s]   time (s) and memory (bytes) of one layer of kind k under s
    M                  memory budget per device (bytes) left after what does not depend on the choice

    minimise   sum_k sum_s n[k] * t[k, s] * x[k, s]
    subject to sum_s x[k, s] = 1                      for every k       [one strategy per kind]
               sum_k sum_s n[k] * m[k, s] * x[k, s] <= M                [fits in device memory]

Solved with HiGHS (highspy) through PuLP, CBC when HiGHS is missing. Ties break towards the strategy listed
first, so the answer is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulp


@dataclass(frozen=True)
class Option:
    """One strategy's price for one layer of a kind."""

    time_s: float
    memory_bytes: float


def _solver() -> pulp.LpSolver:
    highs = pulp.HiGHS(msg=False)
    if highs.available():
        return highs
    return pulp.PULP_CBC_CMD(msg=False)


def choose_strategies(options: dict[str, dict[str, Option]], counts: dict[str, int],
                      memory_budget_bytes: float) -> dict[str, str] | None:
    """Strategy per kind minimising total time within `memory_budget_bytes`; None when nothing fits."""
    problem = pulp.LpProblem("meshplan_layer_strategies", pulp.LpMinimize)
    # coefficients in ms and MiB keep the problem well conditioned
    x = {(k, s): problem.add_variable(f"x_{i}_{j}", cat="Binary")
         for i, (k, opts) in enumerate(options.items()) for j, s in enumerate(opts)}
    # a tiny preference for earlier-listed strategies makes ties deterministic
    problem += pulp.lpSum(
        counts[k] * (opt.time_s * 1e3 + 1e-9 * j) * x[k, s]
        for k, opts in options.items() for j, (s, opt) in enumerate(opts.items()))
    for i, (k, opts) in enumerate(options.items()):
        problem += pulp.lpSum(x[k, s] for s in opts) == 1, f"one_strategy_{i}"
    problem += pulp.lpSum(counts[k] * opt.memory_bytes / 2**20 * x[k, s]
                          for k, opts in options.items() for s, opt in opts.items()) \
        <= memory_budget_bytes / 2**20, "fits_in_memory"
    problem.solve(_solver())
    if pulp.LpStatus[problem.status] != "Optimal":
        return None
    return {k: next(s for s in opts if x[k, s].value() > 0.5) for k, opts in options.items()}
