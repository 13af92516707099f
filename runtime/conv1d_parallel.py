"""Tensor-parallel styles for Hugging Face transformers' `Conv1D` (GPT-2's linears, weight stored [in, out]).

torch's ColwiseParallel / RowwiseParallel only accept nn.Linear (weight [out, in]). A Conv1D computes
`addmm(bias, x, weight)`, the same linear map with the weight transposed, so the styles here are torch's own
(same input and output layouts, same `use_local_output`) with the parameters sharded on the other dim:
- column parallel: weight Shard(1) (its output features), bias Shard(0); the output is sharded on its last dim.
- row parallel: weight Shard(0) (its input features), bias replicated; the partial outputs are all-reduced
  (DTensor turns the replicated bias into a partial one inside `addmm`, so it is added once).
The forward itself is transformers' code running on DTensors: `x.view(-1, in)` and `view(size_out)` use global
sizes (`self.nf`), which stay valid on DTensors.

Blind spot: GPT-2's attention splits the fused `c_attn` output into q, k and v along the sharded dim; DTensor
redistributes that to Replicate (an all-gather), so attention runs replicated on the tp ranks and `c_proj` takes
its local slice again. Exact, but slower than the planner's cost model assumes (it prices attention as sharded).
"""

from __future__ import annotations

from functools import partial

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from planner.linear_modules import is_conv1d


def _shard_parameters(module: nn.Module, device_mesh: DeviceMesh, weight_dim: int, shard_bias: bool,
                      src_data_rank: int | None) -> None:
    for name, param in list(module.named_parameters(recurse=False)):
        placement = Shard(weight_dim) if name == "weight" else (Shard(0) if shard_bias else Replicate())
        dist_param = nn.Parameter(distribute_tensor(param, device_mesh, [placement], src_data_rank=src_data_rank),
                                  requires_grad=param.requires_grad)
        module.register_parameter(name, dist_param)


def _distribute(style, module: nn.Module, device_mesh: DeviceMesh, partition_fn) -> nn.Module:
    return distribute_module(module, device_mesh, partition_fn,
                             partial(style._prepare_input_fn, style.input_layouts, style.desired_input_layouts),
                             partial(style._prepare_output_fn, style.output_layouts, style.use_local_output))


class Conv1DColwiseParallel(ColwiseParallel):
    """ColwiseParallel for a transformers Conv1D: weight [in, out] sharded on dim 1, bias on dim 0."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def partition(name, mod, mesh):
            _shard_parameters(mod, mesh, weight_dim=1, shard_bias=True, src_data_rank=self.src_data_rank)

        return _distribute(self, module, device_mesh, partition)


class Conv1DRowwiseParallel(RowwiseParallel):
    """RowwiseParallel for a transformers Conv1D: weight [in, out] sharded on dim 0, bias replicated, input
    sharded on its last dim (as torch sets for an nn.Linear)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self.desired_input_layouts = (Shard(-1),)

        def partition(name, mod, mesh):
            _shard_parameters(mod, mesh, weight_dim=0, shard_bias=False, src_data_rank=self.src_data_rank)

        return _distribute(self, module, device_mesh, partition)


def conv1d_style(module: nn.Module, colwise: bool):
    """The column (activations kept as DTensors) or row (plain replicated output) style for a Conv1D, or None
    when `module` is not one."""
    if not is_conv1d(module):
        return None
    return Conv1DColwiseParallel(use_local_output=False) if colwise else Conv1DRowwiseParallel()
