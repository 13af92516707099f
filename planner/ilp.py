"""Choose options for the layers on one device: minimum time subject to its memory, as a PuLP ILP.

Layers are grouped: a group is a set of identical layers that also hold the same number of micro-batches
in flight (so every option costs the same for each of them). Identical layers may still choose differently
(checkpoint 10 of 24 blocks), so the variables are counts, not one choice per group.

Legend
    n[g, o] in {0, 1, ..., c[g]}  layers of group g that use option o
    c[g]                          layers in group g
    t[g, o], m[g, o]              time (s) and memory (bytes) of one layer of group g under option o
    M                             memory budget of the device (bytes) left after what the options do not change

    minimise   sum_g sum_o t[g, o] * n[g, o]
    subject to sum_o n[g, o] = c[g]                     for every g       [every layer gets one option]
               sum_g sum_o m[g, o] * n[g, o] <= M                         [fits in device memory]

Solved with HiGHS (highspy) through PuLP, CBC when HiGHS is missing. A tiny cost on later-listed options
makes ties deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulp


@dataclass(frozen=True)
class Option:
    """One option's price for one layer of a group."""

    time_s: float
    memory_bytes: float


def _solver() -> pulp.LpSolver:
    highs = pulp.HiGHS(msg=False)
    if highs.available():
        return highs
    return pulp.PULP_CBC_CMD(msg=False)


def choose_option_counts(options: dict[str, dict[str, Option]], counts: dict[str, int],
                         memory_budget_bytes: float) -> dict[str, dict[str, int]] | None:
    """How many layers of each group take each option, minimising time within the budget; None if nothing fits."""
    problem = pulp.LpProblem("meshplan_layer_options", pulp.LpMinimize)
    n = {(g, o): problem.add_variable(f"n_{i}_{j}", lowBound=0, upBound=counts[g], cat="Integer")
         for i, (g, opts) in enumerate(options.items()) for j, o in enumerate(opts)}
    # [Objective] time in ms, plus a tie-breaker towards earlier options far below any real difference
    problem += pulp.lpSum((opt.time_s * 1e3 + 1e-9 * j) * n[g, o]
                          for g, opts in options.items() for j, (o, opt) in enumerate(opts.items()))
    # [Constraint] every layer gets exactly one option
    for i, (g, opts) in enumerate(options.items()):
        problem += pulp.lpSum(n[g, o] for o in opts) == counts[g], f"every_layer_{i}"
    # [Constraint] the device's memory, in MiB to keep coefficients well conditioned
    problem += pulp.lpSum(opt.memory_bytes / 2**20 * n[g, o]
                          for g, opts in options.items() for o, opt in opts.items()) \
        <= memory_budget_bytes / 2**20, "fits_in_memory"
    problem.solve(_solver())
    if pulp.LpStatus[problem.status] != "Optimal":
        return None
    return {g: {o: round(n[g, o].value() or 0) for o in opts} for g, opts in options.items()}

