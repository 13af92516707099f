"""Apply a Plan's 2-D tensor parallelism (strategy `tensor2d`): each unit's linears sharded over a tp_rows x tp_cols
grid of the tp ranks (1-D tensor parallelism: runtime/parallelize.py).

Vocabulary: the layer's tp mesh (1-D, size tp) is unflattened (`DeviceMesh._unflatten`, same root mesh, so FSDP2
and 1-D tensor-parallel DTensors stay one family) into a grid of `tp_rows` rows x `tp_cols = tp / tp_rows`
columns; grid placements are written (rows, columns). One grid per tp_rows value.

What runs, per linear of a unit (colwise and rowwise alike), with explicit `redistribute` calls so the
collectives are fixed (DTensor's sharding propagation never chooses them for the linears):
- stored weight (Shard(in), Shard(out)): input features over the rows, output features over the columns
  (nn.Linear and traced linears: weight [out, in] -> (Shard(1), Shard(0)); transformers Conv1D [in, out] ->
  (Shard(0), Shard(1))). Bias (Replicate(), Shard(0)).
- input -> (Shard(0), Replicate()): the batch over the rows. For a colwise linear the unit input is a plain
  replicated tensor, wrapped as (Replicate(), Replicate()) and sliced locally (no communication), once for all
  the unit's colwise linears reading it (runtime/unit_input.py); for the rowwise linear it arrives as
  (Shard(0), Shard(-1)) and is all-gathered over the columns.
- weight -> (Replicate(), Shard(out)): all-gathered over the rows.
- the linear on DTensors gives (Shard(0), Shard(-1)): activations inside a unit keep that layout, and the ops
  between the linears (attention reshapes, math SDPA, activations) run on DTensors under `forward_context`.
- the rowwise linear's output -> (Replicate(), Replicate()), returned as a plain local tensor (all-gathers over
  rows and columns), so the rest of the model is untouched, as with 1-D RowwiseParallel.
Backward is DTensor autograd: each weight gradient (partial over the rows) is reduce-scattered over the rows,
the rowwise linear's input gradient (partial over the columns) reduce-scattered over the columns, and the
colwise linears' input gradients, summed on their shared input, all-reduced over the columns once, then
all-gathered over the rows into the unit input's replicated gradient.
tests/test_collective_census.py pins this list, call by call, for GPT's block.

Blind spot (as in 1-D, runtime/conv1d_parallel.py): GPT-2 splits its fused c_attn output, sharded over the
columns, into q, k and v; DTensor all-gathers it over the columns inside `split`, attention runs with all heads on
every column, and c_proj's input all-gather is then a no-op. Exact, and recorded by the census.

The batch (dim 0 of the unit input, one micro-batch) must divide by tp_rows: checked before launch
(`check_tensor_2d_supported`) and again on every forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from planner.linear_modules import is_conv1d
from planner.plan import LayerPlan, Plan
from planner.plan_schema import PlanError
from runtime.parallelize import _submodule, unit_linears

ACTIVATION_PLACEMENTS = (Shard(0), Shard(-1))
"""Inside a unit: batch over the rows, features over the columns."""
LINEAR_INPUT_PLACEMENTS = (Shard(0), Replicate())
"""What each linear computes on: batch over the rows, all input features."""
REPLICATED = (Replicate(), Replicate())


def grid_for(tp_mesh: DeviceMesh, tp_rows: int) -> DeviceMesh:
    """The tp mesh as a (tp_rows, tp / tp_rows) grid, dims named `tp_rows{r}` and `tp_cols{c}` (unique per shape,
    so grids of different shapes never share a name on the root mesh).

    Cached on the root mesh object, one grid per tp_rows: every `_unflatten` call makes new process groups, so
    layers, pipeline stages and tools (tests/collective_census.py) asking for the same grid share its groups."""
    cache = tp_mesh._get_root_mesh().__dict__.setdefault("_meshplan_tp_grids", {})
    key = (tuple(tp_mesh.mesh.flatten().tolist()), tp_rows)
    if key not in cache:
        cols = tp_mesh.size() // tp_rows
        cache[key] = tp_mesh._unflatten(0, (tp_rows, cols), (f"tp_rows{tp_rows}", f"tp_cols{cols}"))
    return cache[key]


class Tensor2DLinearParallel(ParallelStyle):
    """One linear (nn.Linear, transformers Conv1D or a pipeline stage's traced linear) of a `tensor2d` unit on a
    2-D grid mesh; see the module docstring for the layouts. `rowwise`: the unit's last linear, whose output
    becomes a plain replicated tensor. `where` names the layer in errors."""

    def __init__(self, rowwise: bool, where: str):
        super().__init__()
        self.rowwise = rowwise
        self.where = where

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        conv1d = is_conv1d(module)
        in_dim, out_dim = (0, 1) if conv1d else (1, 0)  # weight dims holding input / output features
        stored = {"weight": (Shard(in_dim), Shard(out_dim)), "bias": (Replicate(), Shard(0))}
        gathered_weight = (Replicate(), Shard(out_dim))
        rows = device_mesh.size(0)
        where, src_data_rank = self.where, self.src_data_rank

        def partition(name: str, mod: nn.Module, mesh: DeviceMesh) -> None:
            if mod is not module:
                return
            for param_name, param in list(mod.named_parameters(recurse=False)):
                dist_param = distribute_tensor(param, mesh, stored[param_name], src_data_rank=src_data_rank)
                mod.register_parameter(param_name, nn.Parameter(dist_param, requires_grad=param.requires_grad))

        def prepare_input(mod: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
            x = inputs[0]
            if x.shape[0] % rows:
                raise PlanError(f"layer {where}: tensor2d splits the batch over tp_rows={rows}, but the micro-batch "
                                f"has {x.shape[0]} samples; choose tp_rows dividing the micro-batch size "
                                "(global batch / dp / num_microbatches) or strategy 'tensor'")
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, mesh, REPLICATED, run_check=False)
            if tuple(x.placements) != LINEAR_INPUT_PLACEMENTS:
                # (a no-op redistribute would still reduce the input's partial gradient in backward, once per
                # linear, where the unit's shared input reduces the sum once: runtime/unit_input.py)
                x = x.redistribute(mesh, LINEAR_INPUT_PLACEMENTS)
            return (x, *inputs[1:])

        def forward(x: DTensor) -> DTensor:
            weight = module.weight.redistribute(module.weight.device_mesh, gathered_weight)
            if conv1d:
                out = torch.matmul(x, weight)
                return out if module.bias is None else out + module.bias
            return F.linear(x, weight, getattr(module, "bias", None))

        def prepare_output(mod: nn.Module, output: DTensor, mesh: DeviceMesh):
            output = output.redistribute(mesh, ACTIVATION_PLACEMENTS)  # no-op: the linear's own layout
            return output.redistribute(mesh, REPLICATED).to_local() if self.rowwise else output

        module.forward = forward  # the weight all-gather happens inside the call (hooks and FSDP2 still run)
        return distribute_module(module, device_mesh, partition, prepare_input, prepare_output)


def _check_divisible(layer: LayerPlan, rel: str, features: tuple[int, int], rows: int, cols: int) -> None:
    in_features, out_features = features
    if in_features % rows or out_features % cols:
        raise PlanError(f"layer {layer.path}: tensor2d shards {rel}'s {in_features} input features over "
                        f"tp_rows={rows} and its {out_features} output features over tp / tp_rows={cols}; they "
                        "must divide evenly: choose another tp_rows or strategy 'tensor'")


def check_tensor_2d_supported(plan: Plan) -> None:
    """Refuse, before any rank builds anything, `tensor2d` layers whose micro-batch cannot split over the rows."""
    micro_batch = plan.micro_batch_size
    for layer in plan.layers:
        if layer.strategy == "tensor2d" and micro_batch % layer.tp_rows:
            raise PlanError(f"layer {layer.path}: strategy 'tensor2d' splits the batch over tp_rows="
                            f"{layer.tp_rows}, but the micro-batch has {micro_batch} samples (global batch "
                            f"{plan.model.global_batch_size} / dp={plan.mesh.dp} / num_microbatches="
                            f"{plan.pipeline.num_microbatches}); choose tp_rows dividing {micro_batch}, or "
                            "strategy 'tensor'")


def apply_tensor_parallel_2d(model: nn.Module, plan: Plan, tp_mesh: DeviceMesh) -> None:
    """Shard every `tensor2d` layer's units over its (tp_rows, tp / tp_rows) grid of `tp_mesh`."""
    for layer in plan.layers:
        if layer.strategy != "tensor2d":
            continue
        rows, cols = layer.tp_rows, tp_mesh.size() // layer.tp_rows
        grid = grid_for(tp_mesh, rows)
        module = _submodule(model, layer.path, f"layer {layer.path}")
        for unit in layer.tensor_parallel:
            def to_dtensor(x: torch.Tensor, grid: DeviceMesh = grid) -> DTensor:
                return DTensor.from_local(x, grid, REPLICATED, run_check=False).redistribute(
                    grid, LINEAR_INPUT_PLACEMENTS)

            for rel, sub, rowwise, features in unit_linears(module, layer, unit, to_dtensor):
                _check_divisible(layer, rel, features, rows, cols)
                Tensor2DLinearParallel(rowwise, layer.path)._apply(sub, grid)
