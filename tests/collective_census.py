"""Collective census: every collective DTensor issues in one layer's forward and backward under a plan's tensor
parallelism (`tensor`, with or without sequence parallelism, or `tensor2d`), for checking the cost model's
predicted collectives against what runs.

    from collective_census import census_layer
    census_layer(plan, "blocks.0")   # one process, a fake process group of plan.world_size ranks

What is run: the plan's MODEL, built whole on the CPU; one micro-batch (`plan.micro_batch_size` samples from its
`make_batch`) goes through the unsharded model to capture the layer's input; then tensor parallelism (1-D,
2-D and sequence parallel: runtime/parallelize.py, runtime/tensor_parallel_2d.py, runtime/sequence_parallel.py)
is applied and the layer alone runs forward and
backward (`output.sum().backward()`) under `forward_context`, with a TorchDispatchMode recording each
`torch.ops._c10d_functional` collective (what DTensor redistributions call, forward and backward alike: the
explicit `redistribute` calls and those DTensor's sharding propagation inserts inside an op, e.g. an all-gather
before a `split` along a sharded dim). Data
parallelism is not applied: FSDP/DDP collectives are not DTensor's and not counted.

With no process group initialised it starts the `fake` backend (rank 0 of plan.world_size; collectives return
uninitialised data, which is fine: only shapes matter) and destroys it afterwards; under torchrun it uses the
existing group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from planner.model_spec import load_model_spec
from planner.plan import Plan
from runtime.memory_techniques import apply_activation_checkpointing
from runtime.parallelize import apply_tensor_parallel, forward_context
from runtime.sequence_parallel import apply_sequence_parallel
from runtime.tensor_parallel_2d import apply_tensor_parallel_2d, grid_for
from runtime.train import build_mesh

_FUNCOL = torch.ops._c10d_functional
KINDS = {_FUNCOL.all_gather_into_tensor.default: "all_gather", _FUNCOL.reduce_scatter_tensor.default: "reduce_scatter",
         _FUNCOL.all_reduce.default: "all_reduce", _FUNCOL.all_to_all_single.default: "all_to_all",
         _FUNCOL.broadcast.default: "broadcast"}
"""The functional collectives recorded, by the name the census gives them."""


@dataclass(frozen=True)
class Collective:
    """One collective call on this rank."""

    kind: str
    """`all_gather`, `reduce_scatter`, `all_reduce`, `all_to_all` or `broadcast`."""
    group_size: int
    """Ranks in the process group it runs over."""
    full_bytes: int
    """Bytes of the full tensor: an all-gather's output (gathered), a reduce-scatter's input (before the
    scatter), an all-reduce's, all-to-all's or broadcast's tensor."""
    axis: str
    """The mesh axis of the group: `tp` (1-D tensor parallelism), `tp_rows` / `tp_cols` (a tensor2d grid's rows
    or columns, whatever its shape), another root mesh axis name, or `?` when the group is none of these."""
    phase: str
    """`forward` or `backward`."""
    wire_shape: tuple[int, ...]
    """Shape of that full tensor as the collective sees it: c10d gathers and scatters along dim 0, so a tensor
    sharded on its last dim shows as its local shards stacked on dim 0 (same bytes, other shape)."""


class _CollectiveRecorder(TorchDispatchMode):
    def __init__(self, axis_of_group: dict[str, str]):
        super().__init__()
        self.axis_of_group = axis_of_group
        self.phase = "forward"
        self.calls: list[Collective] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            # modes run before tensor subclasses: hand the op to DTensor, which desugars it (and any redistribution
            # its sharding propagation inserts) into ops on local tensors that come back here with the mode active
            # (CommDebugMode does the same); calling func here would run DTensor with this mode switched off
            return NotImplemented
        kind = KINDS.get(func)
        if kind is not None:
            tensor, group_name = args[0], args[-1]
            group_size = _resolve_process_group(group_name).size()
            shape = tuple(tensor.shape)
            if kind == "all_gather":
                shape = (shape[0] * group_size, *shape[1:])
            self.calls.append(Collective(kind, group_size, tensor.element_size() * int(torch.Size(shape).numel()),
                                         self.axis_of_group.get(group_name, "?"), self.phase, shape))
        return func(*args, **(kwargs or {}))


def _axis_names(plan: Plan, mesh) -> dict[str, str]:
    """Process group name -> mesh axis name, for the root mesh's axes and every tensor2d grid of the plan."""
    names = {mesh.get_group(axis).group_name: axis for axis in mesh.mesh_dim_names if mesh[axis].size() > 1}
    for rows in {layer.tp_rows for layer in plan.layers if layer.strategy == "tensor2d"}:
        grid = grid_for(mesh["tp"], rows)
        names[grid.get_group(0).group_name] = "tp_rows"
        names[grid.get_group(1).group_name] = "tp_cols"
    return names


def census_layer(plan: Plan, layer_path: str) -> list[Collective]:
    """The collectives of `layer_path`'s forward then backward under `plan`'s tensor parallelism, in call order
    (see the module docstring for what runs); an empty list for a replicated layer."""
    started = not dist.is_initialized()
    if started:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", rank=0, world_size=plan.world_size, store=FakeStore())
    try:
        mesh = build_mesh(plan, torch.device("cpu"))
        torch.manual_seed(plan.seed)
        spec = load_model_spec(plan.model.source, device=torch.device("cpu"))
        layer = spec.model.get_submodule(layer_path)
        captured = []
        handle = layer.register_forward_pre_hook(lambda module, args: captured.append(args))
        inputs, _ = spec.make_batch(plan.micro_batch_size, 0)
        with torch.no_grad():
            spec.model(*inputs)
        handle.remove()
        layer_inputs = tuple(t.detach().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor)
                             else t for t in captured[0])
        apply_tensor_parallel(spec.model, plan, mesh["tp"])
        apply_tensor_parallel_2d(spec.model, plan, mesh["tp"])
        apply_sequence_parallel(spec.model, plan, mesh["tp"])
        apply_activation_checkpointing(spec.model, plan)
        recorder = _CollectiveRecorder(_axis_names(plan, mesh))
        with forward_context(plan), recorder:
            output = layer(*layer_inputs)
            recorder.phase = "backward"
            output.sum().backward()
        return recorder.calls
    finally:
        if started:
            dist.destroy_process_group()
