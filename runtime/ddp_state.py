"""DCP state dicts for plans run by DDP where `get_state_dict` does not apply: zero1, and ddp with tensor parallelism.

`torch.distributed.checkpoint.state_dict.get_state_dict` fails on both (measured, torch 2.13):
- zero1: `ZeroRedundancyOptimizer.state_dict()` needs `consolidate_state_dict(to=rank)`, which gathers every
  rank's AdamW state onto one rank (the whole optimizer state on one device: what ZeRO-1 exists to avoid).
- ddp + tp: DDP's 2-D path (`tensor.parallel.ddp._pre_dp_module_transform`) holds tensor-parallel parameters as
  plain local shards tagged `_st_info`, and after the first forward re-registers them as non-parameter DTensor
  attributes, so the module's parameters no longer match the optimizer's (KeyError).

So this module writes the same flattened layout get_state_dict writes with `flatten_optimizer_state_dict`
(model `<fqn>`, optimizer `state.<fqn>.<name>` and `param_groups.<fqn>.<name>`) from the parameters DDP holds
(`meshplan_parameters`, recorded when it wrapped the model) and the optimizer's own per-parameter state:
- a tensor-parallel shard (and its AdamW moments) is wrapped as a DTensor over its tp mesh with
  `DTensor.from_local` (same storage, global shape), so DCP saves one global tensor and reshards it on load;
- zero1: each rank puts in only the AdamW state of the parameters its ZeroRedundancyOptimizer partition owns
  (`optimizer.optim`); DCP writes every key from the rank that has it, and on load each rank reads back its
  own partition's keys (any plan's checkpoint has all of them), so no rank ever gathers the whole state.

Loading writes into these tensors in place (they share storage with the parameters and the optimizer state),
then `restore_hyperparameters` copies the loaded non-tensor values (lr, betas, ...) back into the param groups.
Checkpoints are interchangeable with FSDP2 and pipeline plans' (same keys, global shapes).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import _init_optim_state
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor

from planner.plan import Plan


def needs_ddp_state(plan: Plan) -> bool:
    """zero1, or ddp with tensor-parallel layers: the plans get_state_dict cannot save (module docstring)."""
    return plan.data_parallel.kind == "zero1" or (plan.data_parallel.kind == "ddp" and plan.uses_tensor_parallel)


def _inner_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer holding this rank's state: ZeroRedundancyOptimizer's local AdamW over its partition."""
    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


def _as_global(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`tensor` (the parameter's local value or an AdamW moment of it) as a DTensor over the parameter's tp mesh
    when the parameter is a tensor-parallel shard; the same storage either way."""
    spec = getattr(param, "_st_info", None)
    if spec is None or tensor.shape != param.shape:
        return tensor
    return DTensor.from_local(tensor, spec.mesh, spec.placements, run_check=False, shape=spec.shape,
                              stride=spec.stride)


def _named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    named = getattr(model, "meshplan_parameters", None)
    if named is None:
        raise TypeError("the model was not wrapped by runtime.data_parallel (no meshplan_parameters)")
    return named


def ddp_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts in get_state_dict's flattened layout; the optimizer state is created first
    (a zero-learning-rate step, as get_state_dict does) so that loading has tensors to fill."""
    named = _named_parameters(model)
    inner = _inner_optimizer(optimizer)
    _init_optim_state(inner)
    model_sd = {name: _as_global(param.detach(), param) for name, param in named}
    name_of = {id(param): name for name, param in named}
    optim_sd = {}
    for group in inner.param_groups:
        for param in group["params"]:
            name = name_of[id(param)]
            for key, value in inner.state[param].items():
                optim_sd[f"state.{name}.{key}"] = _as_global(value, param) if isinstance(value, torch.Tensor) \
                    else value
            for key, value in group.items():
                if key != "params":
                    optim_sd[f"param_groups.{name}.{key}"] = value
    return model_sd, optim_sd


def restore_hyperparameters(optimizer: torch.optim.Optimizer, model: nn.Module, loaded: dict) -> None:
    """Copy loaded param-group values (lr, betas, ...) back into the optimizer's param groups, and the loaded
    `step` counts that are plain numbers (tensors were loaded in place)."""
    name_of = {id(param): name for name, param in _named_parameters(model)}
    inner = _inner_optimizer(optimizer)
    for group in inner.param_groups:
        for param in group["params"]:
            name = name_of[id(param)]
            for key in group:
                if key != "params" and f"param_groups.{name}.{key}" in loaded:
                    group[key] = loaded[f"param_groups.{name}.{key}"]
            for key, value in inner.state[param].items():
                if not isinstance(value, torch.Tensor) and f"state.{name}.{key}" in loaded:
                    inner.state[param][key] = loaded[f"state.{name}.{key}"]
