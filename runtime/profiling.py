"""`meshplan execute --profile DIR`: one training step of every rank recorded with torch.profiler.

The step profiled is the last one (after the first step's warm-up: allocator, autotuning, lazy init), and each
rank writes its Chrome trace to DIR/rank{R}.json, which Perfetto or chrome://tracing opens beside
`meshplan show --trace` (the predicted schedule). The directory reaches the ranks torchrun starts through the
environment (PROFILE_ENV), as the other per-run settings do. The profiled step's measured time includes the
profiler's own overhead.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

PROFILE_ENV = "MESHPLAN_PROFILE_DIR"


def profiled_step(start_step: int, steps: int) -> int | None:
    """Which step to profile (the last), or None when no --profile was asked for."""
    return steps - 1 if os.environ.get(PROFILE_ENV) and steps > start_step else None


@contextmanager
def _record(directory: Path, rank: int, step: int):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    directory.mkdir(parents=True, exist_ok=True)
    with torch.profiler.profile(activities=activities) as prof:
        with torch.profiler.record_function(f"meshplan step {step}"):
            yield
    prof.export_chrome_trace(str(directory / f"rank{rank}.json"))


def profile_step(step: int, profiled: int | None, rank: int):
    """A context recording `step` when it is the profiled one (a no-op otherwise)."""
    if profiled is None or step != profiled:
        return nullcontext()
    return _record(Path(os.environ[PROFILE_ENV]), rank, step)
