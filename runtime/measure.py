"""Measure peak memory of one training step on this rank.

On CUDA: the caching allocator's peak (`torch.cuda.max_memory_allocated`). On CPU there is no allocator
statistic, so `torch.distributed._tools.mem_tracker.MemTracker` follows every tensor storage during the step
and reports the peak with a breakdown (parameters, gradients, optimizer states, activations, temporaries).
MemTracker slows the step down, so the runtime measures memory on one step and time on the others.

Only the step's peak is kept, so the tracker here leaves out MemTracker's per-module statistics: those refuse a
module that runs forward again after a backward in the same tracked region ("multiple iterative calls"), which
is what micro-batching does (a pipeline stage runs forward and backward once per micro-batch). Parameters,
gradients and optimizer states are still attributed through `track_external` (with gradient hooks, which the
per-module hooks would have installed); everything else the step allocates counts as activations (forward)
or temporaries (backward).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class MemoryMeasurement:
    peak_bytes: int = 0
    breakdown_bytes: dict[str, int] = field(default_factory=dict)
    """By category (Parameter, Gradient, Optstate, Activation, Temp, ...) when the tracker provides it."""


def _step_peak_tracker():
    """A MemTracker whose per-module hooks do nothing (see the module docstring)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class StepPeakTracker(MemTracker):
        def track_external(self, *external) -> None:
            super().track_external(*external)
            for obj in external:  # the per-module hooks install the gradient hooks otherwise
                if isinstance(obj, nn.Module):
                    self._track_module_params_and_buffers(obj, install_grad_hooks=True)

        def _pre_fw_hook(self, module, inputs) -> None:
            pass

        def _post_fw_hook(self, module, inputs, outputs) -> None:
            pass

        def _pre_bw_hook(self, module, args) -> None:
            pass

        def _post_bw_hook(self, module, args) -> None:
            pass

    return StepPeakTracker()


class PeakMemoryProbe:
    """`with probe.track(model, optimizer): step()` records the peak bytes of that step into `probe.result`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.result = MemoryMeasurement()

    @contextlib.contextmanager
    def track(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            torch.cuda.synchronize(self.device)
            self.result = MemoryMeasurement(peak_bytes=int(torch.cuda.max_memory_allocated(self.device)))
            return
        tracker = _step_peak_tracker()
        tracker.track_external(model, optimizer)
        with tracker:
            yield
        snapshot = tracker.get_tracker_snapshot("peak").get(self.device, {})
        breakdown = {str(getattr(k, "value", k)): int(v) for k, v in snapshot.items()}
        peak = breakdown.pop("Total", sum(breakdown.values()))
        self.result = MemoryMeasurement(peak_bytes=int(peak), breakdown_bytes=breakdown)
