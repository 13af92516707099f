"""One DTensor for the input every column linear of a tensor-parallel unit reads.

torch's ColwiseParallel (and the 2-D style) turns each linear's plain input into a DTensor on its own, so when
q, k and v read the same activation, autograd brings back three partial input gradients and each is reduced
separately: three all-reduces in backward where Megatron-LM does one. Here a forward pre-hook, registered on
every column linear of a unit before its style's own hook, converts the input once per forward and hands all
of them the same DTensor (the styles leave a DTensor in the layout they want alone). Autograd then sums the
three gradients as DTensors and the single conversion reduces the sum once. The planner prices exactly this:
one input-gradient reduction per distinct input of a unit (planner/tensor_parallel_collectives.py).

The DTensor is cached against the identity of the input tensor and dropped when the unit's row linear has run,
so nothing outlives the unit's forward; activation checkpointing's recompute converts its recomputed input anew.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def share_unit_input(colwise: list[nn.Module], rowwise: nn.Module,
                     to_dtensor: Callable[[torch.Tensor], DTensor]) -> None:
    """Give the column linears of one unit one DTensor per distinct plain input (see the module docstring).

    Call before the linears' tensor-parallel styles are applied: pre-hooks run in registration order."""
    cache: dict[str, object] = {}

    def convert(module: nn.Module, args: tuple) -> tuple | None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or isinstance(x, DTensor):
            return None
        source = cache.get("source")
        if source is None or source() is not x:
            cache["source"], cache["dtensor"] = weakref.ref(x), to_dtensor(x)
        return (cache["dtensor"], *args[1:])

    def release(module: nn.Module, args: tuple, output: object) -> None:
        cache.clear()

    if len(colwise) < 2:
        return  # one reader: its style's own conversion is already the only one
    for module in colwise:
        module.register_forward_pre_hook(convert)
    rowwise.register_forward_hook(release)
