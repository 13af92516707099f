"""Pipeline schedules as the cost model sees them: micro-batches in flight per stage and the bubble.

With pp ranks, m micro-batches per step and v virtual stages per rank (interleaved 1F1B):
- GPipe runs every forward before any backward: each stage holds all m micro-batches' activations.
- 1F1B (PipeDream-Flush): stage s (0-based) holds min(pp - s, m).
- Interleaved 1F1B (Megatron-LM, Narayanan et al. 2021): rank r warms up with 2 (pp - r - 1) + (v - 1) pp
  micro-batch chunks, so holds min(m v, that + 1) chunks, each 1/v of its layers; per virtual stage that is
  the count / v.
- Step time = T (m + (pp - 1) / v) where T is the slowest rank's time per micro-batch: the bubble is
  (pp - 1) T / v (v = 1 for GPipe and 1F1B).
Blind spots: uneven stages make the bubble depend on more than the slowest rank; warm-up p2p latency is not
counted separately.
"""

from __future__ import annotations


def in_flight_microbatches(schedule: str, pp: int, stage: int, num_microbatches: int,
                           virtual_stages: int = 1) -> float:
    """Micro-batches whose activations stage `stage` (0 .. pp * virtual_stages - 1) holds at its peak."""
    if schedule == "none" or pp == 1:
        return 1.0
    rank = stage % pp
    if schedule == "gpipe":
        return float(num_microbatches)
    if schedule == "1f1b":
        return float(min(pp - rank, num_microbatches))
    if schedule == "interleaved_1f1b":
        chunks = min(num_microbatches * virtual_stages, 2 * (pp - rank - 1) + (virtual_stages - 1) * pp + 1)
        return chunks / virtual_stages
    raise ValueError(f"unknown pipeline schedule {schedule!r}")


def pipeline_step_factor(pp: int, num_microbatches: int, virtual_stages: int = 1) -> float:
    """Step time / slowest rank's time per micro-batch: m + (pp - 1) / v."""
    return num_microbatches + (pp - 1) / virtual_stages
