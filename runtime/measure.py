"""Measure peak memory of one training step on this rank.

On CUDA: the caching allocator's peak (`torch.cuda.max_memory_allocated`). On CPU there is no allocator
statistic, so `torch.distributed._tools.mem_tracker.MemTracker` follows every tensor storage during the step
and reports the peak with a breakdown (parameters, gradients, optimizer states, activations, temporaries).
MemTracker slows the step down, so the runtime measures memory on one step and time on the others.

Gradient accumulation calls `reset_mod_stats` between micro-batches (MemTracker otherwise takes a second
forward of the root for a new iteration). Pipeline stages cannot use the per-module statistics at all: those
refuse a module that runs forward again after a backward in the same tracked region ("multiple iterative
calls"), which a schedule does once per micro-batch, so for them the tracker leaves them out. Parameters,
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
    """`with probe.track(model, optimizer) as next_microbatch: step()` records the peak bytes of that step into
    `probe.result`. Call `next_microbatch()` before every forward of the model after the first in the step
    (gradient accumulation): MemTracker otherwise takes a second forward of the root for a new iteration."""

    def __init__(self, device: torch.device):
        self.device = device
        self.result = MemoryMeasurement()

    @contextlib.contextmanager
    def track(self, model: nn.Module, optimizer: torch.optim.Optimizer, per_module: bool = True):
        """per_module=False for pipeline stages (see the module docstring); it loses the attribution of FSDP's
        gathered parameters, which then count as activations."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield lambda: None
            torch.cuda.synchronize(self.device)
            self.result = MemoryMeasurement(peak_bytes=int(torch.cuda.max_memory_allocated(self.device)))
            return
        from torch.distributed._tools.mem_tracker import MemTracker

        tracker = MemTracker() if per_module else _step_peak_tracker()
        inner = getattr(optimizer, "optim", None)  # ZeroRedundancyOptimizer keeps its states in a local optimizer
        tracker.track_external(model, optimizer, *([inner] if isinstance(inner, torch.optim.Optimizer) else []))
        with tracker:
            yield tracker.reset_mod_stats  # per-module stats only; the peak over the step is kept
        snapshot = tracker.get_tracker_snapshot("peak").get(self.device, {})
        breakdown = {str(getattr(k, "value", k)): int(v) for k, v in snapshot.items()}
        peak = breakdown.pop("Total", sum(breakdown.values()))
        self.result = MemoryMeasurement(peak_bytes=int(peak), breakdown_bytes=breakdown)
