"""Which modules are linear layers the tensor-parallel machinery can split: `nn.Linear`, and the `Conv1D` of
Hugging Face transformers (GPT-2, GPT-J style models), a linear whose weight is stored transposed.

transformers' Conv1D computes `addmm(bias, x, weight)` with `weight` of shape [in_features, out_features]
(nn.Linear's is [out_features, in_features]), so splitting its outputs (column parallel) shards the weight on
dim 1 and splitting its inputs (row parallel) on dim 0. It is recognised by class name and attributes, so the
planner does not import transformers.
"""

from __future__ import annotations

from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' `Conv1D` (weight [in, out], `nf` output features)."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(weight, nn.Parameter)
            and weight.dim() == 2)


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear or transformers' Conv1D: a module tensor parallelism can split by columns or rows."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_like_features(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of an nn.Linear or a Conv1D; None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        in_features, out_features = module.weight.shape
        return in_features, out_features
    return None
