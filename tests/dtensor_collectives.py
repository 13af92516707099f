"""Record the collectives DTensor issues: what the cost model's collective lists are checked against.

`record_collectives()` is a TorchDispatchMode that logs every c10d functional collective (the ops DTensor's
redistributions run) as a `Recorded(kind, group_size, num_bytes)`:
- kind: `all_reduce`, `all_gather` or `reduce_scatter`;
- group_size: ranks in the process group;
- num_bytes: the all-reduced tensor, the gathered output, or the reduce-scatter's input (the conventions of
  costmodel/communication.py).
It works under the `fake` process group in one process (the collectives return garbage there, so use it
to count, not to compute).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass(frozen=True)
class Recorded:
    kind: str
    group_size: int
    num_bytes: int


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class record_collectives(TorchDispatchMode):  # noqa: N801 - used as a context manager, like torch's modes
    """`with record_collectives() as rec: ...` then `rec.found` lists the collectives in issue order."""

    def __init__(self):
        super().__init__()
        self.found: list[Recorded] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = getattr(func, "overloadpacket", None)
        c10d = torch.ops._c10d_functional
        if packet is c10d.all_reduce:
            size = _resolve_process_group(args[2]).size()
            self.found.append(Recorded("all_reduce", size, _nbytes(args[0])))
        elif packet is c10d.all_gather_into_tensor:
            self.found.append(Recorded("all_gather", args[1], _nbytes(args[0]) * args[1]))
        elif packet is c10d.reduce_scatter_tensor:
            self.found.append(Recorded("reduce_scatter", args[2], _nbytes(args[0])))
        return func(*args, **kwargs)
