"""Sequence parallelism for tensor-parallel layers (Megatron-style, Korthikanti et al. 2022) with DTensor styles.

Inside a `sequence_parallel` layer the activations outside the tensor-parallel units (the residual stream, the
norms, dropout) are sharded over tp on the sequence dimension (dim 1: inputs are batch x sequence x hidden):

- layer input: `PrepareModuleInput` turns the replicated input into a Shard(1) DTensor (a local slice, no
  communication; the gradient is all-gathered in backward);
- norms and dropout (`nn.LayerNorm`, `nn.Dropout`, modules named `*Norm`): `SequenceParallel`, parameters
  replicated over tp (their gradients, partial sums over the sequence shards, are all-reduced by DTensor);
- each unit's colwise linears: their input is all-gathered to Replicate once, on the unit's common parent
  module (`PrepareModuleInput`, e.g. `attn` for q/k/v), or per linear when the parent is the layer itself;
- each unit's rowwise linear: `RowwiseParallel(output_layouts=Shard(1))`, a reduce-scatter instead of the
  all-reduce of plain tensor parallelism;
- layer output: `PrepareModuleOutput` all-gathers back to a replicated plain tensor, so layers around it are
  unchanged.

So per unit the all-reduce becomes all-gather + reduce-scatter (same bytes), the layer boundaries add one
all-gather of the output (and of its gradient), and the norm/residual activations shrink by tp.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from planner.plan import LayerPlan, Plan
from planner.plan_schema import PlanError

SEQUENCE_DIM = 1


def _is_sequence_local(module: nn.Module) -> bool:
    """Modules that act per token, so they can run on a sequence shard: norms and dropout."""
    return isinstance(module, (nn.LayerNorm, nn.Dropout)) or type(module).__name__.endswith("Norm")


def _common_parent(paths: list[str]) -> str:
    parents = {path.rpartition(".")[0] for path in paths}
    return parents.pop() if len(parents) == 1 else ""


def sequence_parallel_styles(module: nn.Module, layer: LayerPlan) -> dict:
    """The parallelize_module plan of one sequence-parallel layer (paths relative to the layer)."""
    styles: dict = {}
    unit_paths = set()
    for unit in layer.tensor_parallel:
        parent = _common_parent(unit.colwise)
        if parent:
            styles[parent] = PrepareModuleInput(input_layouts=(Shard(SEQUENCE_DIM),),
                                                desired_input_layouts=(Replicate(),), use_local_output=False)
        for col in unit.colwise:
            styles[col] = ColwiseParallel(use_local_output=False) if parent else \
                ColwiseParallel(input_layouts=Shard(SEQUENCE_DIM), use_local_output=False)
        styles[unit.rowwise] = RowwiseParallel(output_layouts=Shard(SEQUENCE_DIM), use_local_output=False)
        unit_paths.update(unit.colwise + [unit.rowwise])
    for name, sub in module.named_modules():
        if name and _is_sequence_local(sub) and not any(name.startswith(p + ".") for p in unit_paths):
            styles[name] = SequenceParallel(sequence_dim=SEQUENCE_DIM)
    return styles


def apply_sequence_parallel(model: nn.Module, plan: Plan, tp_mesh: DeviceMesh) -> None:
    """Tensor- and sequence-parallelise every `sequence_parallel` layer (apply_tensor_parallel skips them)."""
    for layer in plan.layers:
        if not layer.sequence_parallel:
            continue
        if plan.mesh.pp > 1:
            raise PlanError(f"layer {layer.path}: sequence_parallel is not supported with pipeline parallelism "
                            "yet; set it to false")
        module = model.get_submodule(layer.path) if layer.path else model
        for unit in layer.tensor_parallel:
            for rel in unit.colwise + [unit.rowwise]:
                sub = module.get_submodule(rel)
                if not isinstance(sub, nn.Linear):
                    raise PlanError(f"layer {layer.path}: tensor_parallel names {rel!r}, which is a "
                                    f"{type(sub).__name__}, not an nn.Linear")
                dim = sub.out_features if rel in unit.colwise else sub.in_features
                if dim % tp_mesh.size():
                    raise PlanError(f"layer {layer.path}: {rel} has {dim} features, not divisible by "
                                    f"tp={tp_mesh.size()}")
        parallelize_module(module, tp_mesh, sequence_parallel_styles(module, layer))
        parallelize_module(module, tp_mesh, PrepareModuleInputOutput(
            input_layouts=(Replicate(),), desired_input_layouts=(Shard(SEQUENCE_DIM),), use_local_input=False,
            output_layouts=(Shard(SEQUENCE_DIM),), desired_output_layouts=(Replicate(),), use_local_output=True))
