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

Under a pipeline the layer is part of a traced stage module (runtime/pipeline.py): its linears are one-op
InterpreterModules (runtime/traced_linear.py has their styles) and its norms are no longer nn.LayerNorm, so
which submodules are sequence-local is read from the model before it is traced (`sequence_local_modules`); the
stage keeps the FQNs. The layer output is a replicated plain tensor, so stage boundaries send what they would
without sequence parallelism.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    PrepareModuleInput,
    PrepareModuleInputOutput,
    SequenceParallel,
    parallelize_module,
)

from planner.linear_modules import is_conv1d
from planner.plan import LayerPlan, Plan
from planner.plan_schema import PlanError
from runtime.parallelize import _submodule, unit_linears
from runtime.traced_linear import colwise_style, rowwise_style

SEQUENCE_DIM = 1


def _is_sequence_local(module: nn.Module) -> bool:
    """Modules that act per token, so they can run on a sequence shard: norms and dropout."""
    return isinstance(module, (nn.LayerNorm, nn.Dropout)) or type(module).__name__.endswith("Norm")


def _common_parent(paths: list[str]) -> str:
    parents = {path.rpartition(".")[0] for path in paths}
    return parents.pop() if len(parents) == 1 else ""


def sequence_local_modules(model: nn.Module, plan: Plan) -> dict[str, list[str]]:
    """For every `sequence_parallel` layer of `model` (an nn.Module, before any pipeline tracing): its
    sequence-local submodules (norms, dropout) outside its units, as paths relative to the layer."""
    found = {}
    for layer in plan.layers:
        if not layer.sequence_parallel:
            continue
        module = _submodule(model, layer.path, f"layer {layer.path}")
        unit_paths = {rel for unit in layer.tensor_parallel for rel in (*unit.colwise, unit.rowwise)}
        found[layer.path] = [name for name, sub in module.named_modules()
                             if name and _is_sequence_local(sub)
                             and not any(name == p or name.startswith(p + ".") for p in unit_paths)]
    return found


def sequence_parallel_styles(module: nn.Module, layer: LayerPlan, tp_mesh: DeviceMesh,
                             sequence_local: list[str]) -> dict:
    """The parallelize_module plan of one sequence-parallel layer (paths relative to the layer); `module` is an
    nn.Module or a traced stage's submodule."""
    styles: dict = {}

    def to_dtensor(x):  # a plain input of several column linears (no common parent): one all-gather for all
        return DTensor.from_local(x, tp_mesh, (Shard(SEQUENCE_DIM),), run_check=False).redistribute(
            tp_mesh, (Replicate(),))

    for unit in layer.tensor_parallel:
        parent = _common_parent(unit.colwise)
        if parent:
            styles[parent] = PrepareModuleInput(input_layouts=(Shard(SEQUENCE_DIM),),
                                                desired_input_layouts=(Replicate(),), use_local_output=False)
        for rel, sub, rowwise, (in_features, out_features) in unit_linears(module, layer, unit, to_dtensor):
            if is_conv1d(sub):
                raise PlanError(f"layer {layer.path}: sequence_parallel runs nn.Linear units only, and {rel} is a "
                                "transformers Conv1D; set sequence_parallel to false")
            dim = in_features if rowwise else out_features
            if dim % tp_mesh.size():
                raise PlanError(f"layer {layer.path}: {rel} has {dim} features, not divisible by "
                                f"tp={tp_mesh.size()}")
            if rowwise:
                styles[rel] = rowwise_style(sub, output_layouts=Shard(SEQUENCE_DIM), use_local_output=False)
            else:
                styles[rel] = colwise_style(sub) if parent else colwise_style(sub, input_layouts=Shard(SEQUENCE_DIM))
    for name in sequence_local:
        _submodule(module, name, f"layer {layer.path}")
        styles[name] = SequenceParallel(sequence_dim=SEQUENCE_DIM)
    return styles


def apply_sequence_parallel(model: nn.Module, plan: Plan, tp_mesh: DeviceMesh,
                            sequence_local: dict[str, list[str]] | None = None) -> None:
    """Tensor- and sequence-parallelise every `sequence_parallel` layer of `model` (apply_tensor_parallel skips
    them). `model` is the whole model, or a pipeline stage module with `sequence_local` read from the model
    before tracing (`sequence_local_modules`)."""
    if sequence_local is None:
        sequence_local = sequence_local_modules(model, plan)
    for layer in plan.layers:
        if not layer.sequence_parallel:
            continue
        module = _submodule(model, layer.path, f"layer {layer.path}")
        parallelize_module(module, tp_mesh, sequence_parallel_styles(module, layer, tp_mesh,
                                                                     sequence_local[layer.path]))
        parallelize_module(module, tp_mesh, PrepareModuleInputOutput(
            input_layouts=(Replicate(),), desired_input_layouts=(Shard(SEQUENCE_DIM),), use_local_input=False,
            output_layouts=(Shard(SEQUENCE_DIM),), desired_output_layouts=(Replicate(),), use_local_output=True))
