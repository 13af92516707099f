"""Fast optimistic estimate of the ILP in planner/ilp.py, used to screen thousands of configurations.

It solves the LP relaxation exactly (a fractional multiple-choice knapsack): each group's options are
reduced to their lower convex hull in (memory, time), every group starts at its fastest option, and memory
is then bought back along hull edges in order of least time added per byte saved. The result is a lower
bound on the ILP's time, and the ILP is feasible exactly when this is (all-leanest fits). The search ranks
configurations with it and solves the ILP only for the ones that can still win.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from planner.ilp import Option


@dataclass(frozen=True)
class HullStep:
    """Moving one layer one edge down its hull: saves `memory_bytes`, costs `time_s`."""

    memory_bytes: float
    time_s: float

    @property
    def seconds_per_byte(self) -> float:
        return self.time_s / self.memory_bytes


@dataclass(frozen=True)
class GroupHull:
    """A group's options as the fastest point plus hull edges towards the leanest point."""

    fastest: Option
    leanest_memory_bytes: float
    steps: tuple[HullStep, ...]


def group_hull(options: list[Option]) -> GroupHull:
    """Lower convex hull (monotone chain) of (memory saved, time added) from the fastest option."""
    fastest = min(options, key=lambda o: (o.time_s, o.relaxed_memory_bytes))
    points = sorted({(fastest.relaxed_memory_bytes - o.relaxed_memory_bytes, o.time_s - fastest.time_s)
                     for o in options if o.relaxed_memory_bytes <= fastest.relaxed_memory_bytes})
    hull: list[tuple[float, float]] = []
    for point in points:
        if hull and point[0] == hull[-1][0]:
            continue  # same memory, slower: never on the lower hull
        while len(hull) >= 2:
            (ox, oy), (ax, ay) = hull[-2], hull[-1]
            if (ax - ox) * (point[1] - oy) - (ay - oy) * (point[0] - ox) > 0:
                break
            hull.pop()
        hull.append(point)
    steps = tuple(HullStep(bx - ax, by - ay) for (ax, ay), (bx, by) in zip(hull, hull[1:], strict=False))
    return GroupHull(fastest, fastest.relaxed_memory_bytes - hull[-1][0], steps)


def fractional_fit_time_s(hulls: list[tuple[GroupHull, float]], memory_budget_bytes: float) -> float:
    """Least total time of the LP relaxation for (hull, layer count) pairs; inf when even all-leanest overflows."""
    memory = sum(h.fastest.relaxed_memory_bytes * count for h, count in hulls)
    time = sum(h.fastest.time_s * count for h, count in hulls)
    if memory <= memory_budget_bytes:
        return time
    if sum(h.leanest_memory_bytes * count for h, count in hulls) > memory_budget_bytes * (1 + 1e-12):
        return math.inf
    edges = sorted(((step, count) for h, count in hulls for step in h.steps if count),
                   key=lambda e: e[0].seconds_per_byte)
    excess = memory - memory_budget_bytes
    for step, count in edges:
        capacity = step.memory_bytes * count
        if capacity >= excess:
            return time + excess * step.seconds_per_byte
        time += step.time_s * count
        excess -= capacity
    return time
