"""How much of a layer's data-parallel communication stays on the critical path once it overlaps compute.

FSDP2 and DDP run their collectives on their own streams: FSDP2 prefetches the next layer's all-gather while
this layer computes (forward and backward), and both reduce a layer's gradients while backward moves on to
the layers before it. A layer's collectives all use the same links, so they queue behind one another and hide
under one stretch of compute together, never more than it lasts:

    hidden_gather  = f_gather * min(gather_s, gather_window_s)
    hidden_reduce  = f_reduce * min(reduce_s, max(0, min(reduce_window_s, gather_window_s - hidden_gather)))
    exposed_s      = gather_s + reduce_s - hidden_gather - hidden_reduce

gather_window_s is the compute the layer's gathers run beside in a step (every micro-batch's forward, backward
and recomputation); reduce_window_s the compute its gradient reduction runs beside (the last micro-batch's
backward and recomputation: with accumulation the reduction waits for the last micro-batch). The reduction's
window is what the gathers left of the shared one. f_gather and f_reduce are the profile's
`overlap.fsdp_all_gather` and `overlap.gradient_reduction` (1 = hidden up to the window). The planner picks
the windows (planner/evaluate_config.py `data_parallel_windows_s`); this module only combines them.

Blind spots: compute slowed by communication kernels sharing SMs and memory bandwidth is not modelled; the
first layer's forward gather and the last reduction cannot hide at all (their share is small for deep stacks
and is not charged); windows are per layer, so a short layer next to a long one hides less than it could.
"""

from __future__ import annotations

import math

from .cluster import OverlapSpec

__all__ = ["data_parallel_exposed_s"]


def data_parallel_exposed_s(gather_s: float, reduce_s: float, gather_window_s: float, reduce_window_s: float,
                            overlap: OverlapSpec) -> float:
    """Seconds of a layer's parameter gathers and gradient reductions per step left exposed (module docstring)."""
    for name, value in (("gather_s", gather_s), ("reduce_s", reduce_s), ("gather_window_s", gather_window_s),
                        ("reduce_window_s", reduce_window_s)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    hidden_gather = overlap.fsdp_all_gather * min(gather_s, gather_window_s)
    left_s = max(0.0, min(reduce_window_s, gather_window_s - hidden_gather))
    hidden_reduce = overlap.gradient_reduction * min(reduce_s, left_s)
    return gather_s + reduce_s - hidden_gather - hidden_reduce
