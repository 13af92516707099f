"""Choose options for the layers on one device: minimum time subject to its memory, as a PuLP ILP.

Layers are grouped: a group is a set of identical layers that also hold the same number of micro-batches
in flight (so every option costs the same for each of them). Identical layers may still choose differently
(checkpoint 10 of 24 blocks), so the variables are counts, not one choice per group.

Legend
    n[g, o] in {0, 1, ..., c[g]}  layers of group g that use option o
    y[g, o] in {0, 1}             option o is used by some layer of group g (only for options with buffers)
    c[g]                          layers in group g
    t[g, o]                       time (s) of one layer of group g under option o
    m[g, o]                       bytes it holds all step (parameters, optimizer states, and gradients and
                                  activations when they coexist)
    a[g, o], d[g, o]              activations and gradients when they do not coexist (one micro-batch: the
                                  gradients appear as backward frees the activations), else 0
    w[g, o], z[g, o]              transient buffers while it runs: rematerialised activations, gathered
                                  parameters (only the largest of each is live at once)
    W, Z, T >= 0                  the largest w and z in use, and the peak of the part that varies in a step
    M                             usable memory of the device (bytes)

    minimise   sum_g sum_o t[g, o] * n[g, o]
    subject to sum_o n[g, o] = c[g]                     for every g       [every layer gets one option]
               n[g, o] <= c[g] * y[g, o];  W >= w[g, o] y[g, o];  Z >= z[g, o] y[g, o]     [largest buffers]
               T >= sum a n + W + Z;  T >= sum d n                        [activations+buffers or gradients]
               sum_g sum_o m[g, o] * n[g, o] + T <= M                     [fits in device memory]

Solved with HiGHS (highspy) through PuLP, CBC when HiGHS is missing. A tiny cost on later-listed options
makes ties deterministic.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass

import pulp


@dataclass(frozen=True)
class Option:
    """One option's price for one layer of a group (see the legend for the memory parts)."""

    time_s: float
    memory_bytes: float
    activation_bytes: float = 0.0
    gradient_bytes: float = 0.0
    working_bytes: float = 0.0
    gathered_bytes: float = 0.0

    @property
    def relaxed_memory_bytes(self) -> float:
        """A lower bound of what the option adds to the peak, linear in the count (for LP screening)."""
        return self.memory_bytes + self.activation_bytes


@functools.cache
def _silence_highs_banner() -> None:
    """HiGHS's C library prints a two-line banner on stdout (file descriptor 1, out of Python's reach) the first
    time a process builds a solver, whatever `msg` says; build that first one with fd 1 on /dev/null, so
    `meshplan plan` prints only its own output (and `plan --out -`-style pipes stay clean)."""
    try:
        import highspy
    except ImportError:
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _solver() -> pulp.LpSolver:
    highs = pulp.HiGHS(msg=False)
    if highs.available():
        _silence_highs_banner()
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
    mib = 2**20  # coefficients in MiB keep the problem well conditioned
    peak = problem.add_variable("varying_peak", lowBound=0)
    largest = {"working": problem.add_variable("largest_working", lowBound=0),
               "gathered": problem.add_variable("largest_gathered", lowBound=0)}
    for i, (g, opts) in enumerate(options.items()):
        for j, (o, opt) in enumerate(opts.items()):
            if not (opt.working_bytes or opt.gathered_bytes):
                continue
            # [Constraint] a used option's buffers bound the largest buffer
            used = problem.add_variable(f"y_{i}_{j}", cat="Binary")
            problem += n[g, o] <= counts[g] * used, f"used_{i}_{j}"
            problem += largest["working"] >= opt.working_bytes / mib * used, f"working_{i}_{j}"
            problem += largest["gathered"] >= opt.gathered_bytes / mib * used, f"gathered_{i}_{j}"
    # [Constraint] the varying part peaks at activations + buffers, or at the gradients
    problem += peak >= pulp.lpSum(opt.activation_bytes / mib * n[g, o] for g, opts in options.items()
                                  for o, opt in opts.items()) + largest["working"] + largest["gathered"], "peak_fwd"
    problem += peak >= pulp.lpSum(opt.gradient_bytes / mib * n[g, o] for g, opts in options.items()
                                  for o, opt in opts.items()), "peak_grad"
    # [Constraint] the device's memory
    problem += pulp.lpSum(opt.memory_bytes / mib * n[g, o] for g, opts in options.items()
                          for o, opt in opts.items()) + peak <= memory_budget_bytes / mib, "fits_in_memory"
    problem.solve(_solver())
    if pulp.LpStatus[problem.status] != "Optimal":
        return None
    return {g: {o: round(n[g, o].value() or 0) for o in opts} for g, opts in options.items()}

