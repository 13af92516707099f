"""Cut the layer chain into pipeline stages that minimise the slowest stage (the pipeline's bottleneck).

segment_cost(stage, start, end) prices layers start..end-1 as stage `stage` (infinite when they do not fit
in memory there). Stage costs may differ by stage (a 1F1B stage near the front holds more micro-batches), but
must be monotone: adding a layer to a segment never makes it cheaper. Then, for a bottleneck T, filling stages
greedily left to right (each takes the longest prefix costing <= T, leaving one layer for every later
stage) succeeds whenever any partition with bottleneck <= T exists: giving an earlier stage more layers only
leaves later stages a suffix of what they would otherwise get. Bisection on T finds the optimum to a
relative tolerance, in O(layers x log(1/tolerance)) cost evaluations instead of the O(stages x layers^2)
of the textbook dynamic programme (Alpa's stage DP without the device-mesh dimension).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

SegmentCost = Callable[[int, int, int], float]


def _fill(num_layers: int, num_stages: int, segment_cost: SegmentCost, bottleneck: float) -> list[int] | None:
    """Stage start indices from greedy filling under `bottleneck`, or None when it cannot be met."""
    starts, start = [], 0
    for stage in range(num_stages):
        starts.append(start)
        last_allowed = num_layers - (num_stages - 1 - stage)
        if stage == num_stages - 1:
            return starts if segment_cost(stage, start, num_layers) <= bottleneck else None
        end = start + 1
        if segment_cost(stage, start, end) > bottleneck:
            return None
        while end < last_allowed and segment_cost(stage, start, end + 1) <= bottleneck:
            end += 1
        start = end
    return None


def stage_costs(starts: list[int], num_layers: int, segment_cost: SegmentCost) -> list[float]:
    ends = starts[1:] + [num_layers]
    return [segment_cost(k, s, e) for k, (s, e) in enumerate(zip(starts, ends, strict=False))]


def partition_chain(num_layers: int, num_stages: int, segment_cost: SegmentCost,
                    rel_tolerance: float = 1e-4) -> tuple[list[int], float] | None:
    """(stage start indices, bottleneck cost) minimising the most expensive stage; None if nothing fits."""
    if num_stages < 1 or num_stages > num_layers:
        return None
    starts = _fill(num_layers, num_stages, segment_cost, sys.float_info.max)  # any feasible partition
    if starts is None:
        return None
    hi = max(stage_costs(starts, num_layers, segment_cost))
    if not math.isfinite(hi):
        return None
    best = starts
    lo = 0.0
    while hi - lo > rel_tolerance * hi:
        mid = (lo + hi) / 2
        attempt = _fill(num_layers, num_stages, segment_cost, mid)
        if attempt is None:
            lo = mid
        else:
            best, hi = attempt, max(stage_costs(attempt, num_layers, segment_cost))
    return best, hi
