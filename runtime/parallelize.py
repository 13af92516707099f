"""Apply a Plan's tensor parallelism: DTensor `parallelize_module` per layer (data parallelism: data_parallel.py).

Tensor-parallel layers keep activations as DTensors between their column and row linears
(`use_local_output=False`), so code that reshapes with global sizes (`view(b, s, n_heads, d)` with sizes read
from the tensor) stays correct; the row linear returns a plain replicated tensor, so the rest of the model
is untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.experimental import implicit_replication
from torch.distributed.tensor.parallel import parallelize_module
from torch.nn.attention import SDPBackend, sdpa_kernel

from planner.plan import LayerPlan, Plan, TensorParallelUnitPlan
from planner.plan_schema import PlanError
from runtime.conv1d_parallel import conv1d_style
from runtime.traced_linear import colwise_style, linear_features, rowwise_style
from runtime.unit_input import share_unit_input


def _submodule(model: nn.Module, path: str, source: str) -> nn.Module:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError as err:
        raise PlanError(f"{source}: the model has no module {path!r}; the plan was made for another model") from err


def unit_linears(module: nn.Module, layer: LayerPlan, unit: TensorParallelUnitPlan,
                 to_dtensor: Callable[[torch.Tensor], DTensor]) -> list[tuple[str, nn.Module, bool, tuple[int, int]]]:
    """The unit's linears of `layer` (whose module is `module`) as (path relative to the layer, module, rowwise,
    (in, out) features), column linears first: nn.Linear, a pipeline stage's traced linear or a transformers
    Conv1D, else a PlanError. The column linears are given one shared DTensor input made by `to_dtensor`
    (runtime/unit_input.py); call before their styles are applied."""
    found = []
    for rel, rowwise in [(col, False) for col in unit.colwise] + [(unit.rowwise, True)]:
        sub = _submodule(module, rel, f"layer {layer.path}")
        features = linear_features(sub)
        if features is None:
            raise PlanError(f"layer {layer.path}: tensor_parallel names {rel!r}, which is a "
                            f"{type(sub).__name__}, not an nn.Linear (or transformers Conv1D)")
        found.append((rel, sub, rowwise, features))
    share_unit_input([sub for _, sub, rowwise, _ in found if not rowwise], found[-1][1], to_dtensor)
    return found


def apply_tensor_parallel(model: nn.Module, plan: Plan, tp_mesh: DeviceMesh) -> None:
    """Shard every `tensor` layer's units over `tp_mesh` with ColwiseParallel / RowwiseParallel, the column
    linears of a unit sharing one DTensor input (runtime/unit_input.py); sequence-parallel layers are left to
    runtime/sequence_parallel.py."""
    for layer in plan.layers:
        if layer.strategy != "tensor" or layer.sequence_parallel:
            continue
        module = _submodule(model, layer.path, f"layer {layer.path}")
        styles = {}

        def to_dtensor(x: torch.Tensor) -> DTensor:
            return DTensor.from_local(x, tp_mesh, (Replicate(),), run_check=False)

        for unit in layer.tensor_parallel:
            for rel, sub, rowwise, (in_features, out_features) in unit_linears(module, layer, unit, to_dtensor):
                style = rowwise_style if rowwise else colwise_style
                styles[rel] = conv1d_style(sub, colwise=not rowwise) or style(sub)
                dim = in_features if rowwise else out_features
                if tp_mesh.size() > 1 and dim % tp_mesh.size():
                    raise PlanError(f"layer {layer.path}: {rel} has {dim} features, not divisible by "
                                    f"tp={tp_mesh.size()}")
        parallelize_module(module, tp_mesh, styles)
        gather_replicated_gradients(module, layer)


def _full_gradient(grad: torch.Tensor) -> torch.Tensor:
    return grad.full_tensor() if isinstance(grad, DTensor) else grad


def _hook_replicated_parameters(owner: nn.Module, args) -> None:
    """Forward pre-hook: give the plain parameters `owner` trains this forward (FSDP2's unsharded ones too, which
    are other tensors than the sharded ones) a gradient hook that turns a DTensor gradient into the whole
    gradient, once per tensor."""
    for name in owner._meshplan_replicated:
        param = owner._parameters.get(name)
        if isinstance(param, torch.Tensor) and not isinstance(param, DTensor) and param.requires_grad \
                and not getattr(param, "_meshplan_full_gradient", False):
            param.register_hook(_full_gradient)
            param._meshplan_full_gradient = True


def gather_replicated_gradients(module: nn.Module, layer: LayerPlan) -> None:
    """Plain (replicated) parameters used between a unit's column and row linears get plain gradients.

    Inside a unit the activations are DTensors sharded on the features (heads); a plain parameter that meets
    them under implicit replication (Swin's `relative_position_bias_table`, added to the attention scores of each
    head) receives a DTensor gradient (`Shard(1)`), which FSDP2's reduce-scatter cannot take (`fsdp.chunk_cat`
    has no sharding strategy) and DDP would not reduce. Every plain parameter under the module holding a unit's
    column linears (other than the unit's linears) gets a gradient hook that gathers such a gradient into the
    whole one (`full_tensor`: an all-gather of the shards or a sum of partial values over tp), which is the
    gradient one process computes.
    """
    for unit in layer.tensor_parallel:
        parent = unit.colwise[0].rpartition(".")[0]
        for col in unit.colwise[1:]:
            while parent and not (col == parent or col.startswith(parent + ".")):
                parent = parent.rpartition(".")[0]
        scope = module.get_submodule(parent) if parent else module
        linears = {*unit.colwise, unit.rowwise}
        for rel, owner in scope.named_modules():
            path = f"{parent}.{rel}".strip(".") if rel else parent
            if path in linears or any(path.startswith(linear + ".") for linear in linears):
                continue
            names = [name for name, param in owner.named_parameters(recurse=False) if not isinstance(param, DTensor)]
            if names and not hasattr(owner, "_meshplan_replicated"):
                owner._meshplan_replicated = names
                owner.register_forward_pre_hook(_hook_replicated_parameters)


def forward_context(plan: Plan) -> contextlib.AbstractContextManager:
    """Context for running a forward with tensor-parallel layers.

    The math SDPA backend decomposes attention into matmul/softmax, which DTensor shards (its fused CPU
    kernels have no sharding rule); implicit replication lets plain tensors created inside the model (masks,
    positions) mix with DTensor activations.
    """
    if not plan.uses_tensor_parallel:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
    stack.enter_context(implicit_replication())
    return stack
