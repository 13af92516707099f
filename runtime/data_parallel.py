"""Apply a plan's data parallelism (ddp, zero1, zero2, zero3, HSDP, offload, mixed precision) and build its optimizer.

What each kind runs, on torch.distributed's own machinery, and what it keeps on every dp rank between steps
(the cost model prices exactly this):

- `ddp`: `torch.nn.parallel.DistributedDataParallel` over mesh["dp"]. Parameters, gradients and AdamW states
  are whole on every dp rank; gradients are all-reduced in buckets during backward. With tensor parallelism
  DDP is given `device_mesh=mesh["dp"]`, which turns DTensor parameters into local tensors outside the forward
  (`tensor.parallel.ddp._pre_dp_module_transform`, DDP's own 2-D path); parameters and gradients of
  tensor-parallel layers are then plain local shards tagged with `_st_info`. (FSDP2's replicate-only mode,
  `_composable.replicate_with_fsdp.replicate`, also runs, but holds a second, "unsharded" copy of every
  parameter during forward and backward: 1.85x the parameter bytes of DDP, measured with MemTracker.)
  Mixed precision: `torch.autocast` in param_dtype over fp32 parameters; reduce_dtype other than float32 is
  DDP's bf16/fp16 compression communication hook (NCCL only).
- `zero1`: the same DDP plus `torch.distributed.optim.ZeroRedundancyOptimizer`: each rank keeps AdamW states for
  ~1/shard of the parameters (whole tensors, greedily balanced), updates those and broadcasts them within its
  shard group. With HSDP (replicate > 1) DDP still all-reduces over all of dp and ZeroRedundancyOptimizer
  shards over the dp_shard group only: every replica group computes the same update.
  (ZeroRedundancyOptimizer broadcasts with `c10d.broadcast_`, which DTensor has no sharding rule for: one
  more reason for DDP's local-tensor path under tensor parallelism.)
- `zero2`: FSDP2 `fully_shard(reshard_after_forward=False)` per chain layer. Between steps parameters, gradients
  and AdamW states are sharded 1/shard; in forward each layer's parameters are all-gathered once and stay
  gathered until its backward is done (no second all-gather), so from a layer's forward to its backward the
  rank holds its full parameters; gradients are reduce-scattered. This differs from textbook ZeRO-2 (full
  parameters held always, all-gathered after the optimizer step): the communication volume is the same
  (one all-gather + one reduce-scatter of the parameters per step) and peak memory is the same (all layers
  gathered at the end of forward), but the all-gather happens at the start of the next forward.
- `zero3`: FSDP2 `fully_shard(reshard_after_forward=plan.data_parallel.reshard_after_forward)`: parameters are
  freed after each layer's forward and all-gathered again in backward when True.
- HSDP (`replicate` > 1, zero2/zero3): `fully_shard` on a 2-D (dp_replicate, dp_shard) mesh made by
  `DeviceMesh._unflatten` of the dp axis: sharded inside groups of dp / replicate ranks, all-reduced across them.
  zero1 with replicate > 1: see zero1.
- `offload` (zero3): FSDP2 `CPUOffloadPolicy`: sharded parameters, gradients and AdamW states live on the host,
  the optimizer steps on the CPU (`pin_memory` only on CUDA).
- Mixed precision for zero2/zero3: `MixedPrecisionPolicy(param_dtype, reduce_dtype)`: sharded fp32 master
  parameters are cast to param_dtype when gathered, gradients are reduced in reduce_dtype and kept fp32.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from planner.plan import Plan

DDP_KINDS = ("ddp", "zero1")
"""Kinds run by DistributedDataParallel; zero2 and zero3 run FSDP2 `fully_shard`."""


def data_parallel_mesh(plan: Plan, mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP2 / DDP shards over: mesh["dp"], or for HSDP a 2-D (dp_replicate, dp_shard) mesh.

    `mesh` is the runtime's 3-D (pp, dp, tp) mesh; the HSDP mesh is unflattened from the same root so tensor
    parallel DTensors (on mesh["tp"]) and FSDP's DTensors live on one device mesh family.
    """
    replicate = plan.data_parallel.replicate
    if replicate == 1:
        return mesh["dp"]
    shard = plan.mesh.dp // replicate
    hsdp = mesh._unflatten("dp", (replicate, shard), ("dp_replicate", "dp_shard"))
    return hsdp["dp_replicate", "dp_shard"]


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def mixed_precision_policy(plan: Plan) -> MixedPrecisionPolicy:
    """FSDP2 policy: compute in param_dtype, reduce gradients in reduce_dtype (None = keep fp32 parameters)."""
    param, reduce = plan.precision.param_dtype, plan.precision.reduce_dtype
    if param == "float32" and reduce == "float32":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=_torch_dtype(param), reduce_dtype=_torch_dtype(reduce))


def _offload_policy(plan: Plan, device: torch.device) -> OffloadPolicy:
    return CPUOffloadPolicy(pin_memory=device.type == "cuda") if plan.data_parallel.offload else OffloadPolicy()


def _layer_groups(model: nn.Module, plan: Plan) -> list[list[nn.Module]]:
    """The chain layers that own parameters, grouped so that layers sharing a parameter (a head tied to the
    token embedding) form one group: FSDP2 manages each parameter in exactly one group, so tied layers are
    sharded together (`fully_shard([wte, lm_head])`, one all-gather serves both)."""
    groups: list[list[nn.Module]] = []
    group_of: dict[int, int] = {}  # id(parameter) -> index into groups
    for layer in plan.layers:
        if not layer.path:
            continue
        module = model.get_submodule(layer.path)
        params = [id(p) for p in module.parameters()]
        if not params:
            continue
        shared = sorted({group_of[p] for p in params if p in group_of})
        if not shared:
            groups.append([module])
            index = len(groups) - 1
        else:
            index = shared[0]
            for other in shared[1:]:  # this layer ties two earlier groups together: merge them
                groups[index].extend(groups[other])
                groups[other] = []
                group_of.update({p: index for p, g in group_of.items() if g == other})
            groups[index].append(module)
        group_of.update({p: index for p in params})
    return [group for group in groups if group]


def check_data_parallel_supported(plan: Plan) -> list[str]:
    """Plan data-parallel settings this module cannot run, as readable reasons (empty when all is fine)."""
    dpp = plan.data_parallel
    missing = []
    if dpp.kind in DDP_KINDS and plan.precision.reduce_dtype != "float32":
        if plan.precision.reduce_dtype != plan.precision.param_dtype:
            missing.append(f"{dpp.kind} with reduce_dtype {plan.precision.reduce_dtype} different from param_dtype "
                           f"{plan.precision.param_dtype} (DDP compresses gradients to the compute dtype only)")
        elif plan.cluster.get("backend") != "nccl":
            missing.append(f"{dpp.kind} with reduce_dtype {plan.precision.reduce_dtype} on gloo (DDP's gradient "
                           "compression hooks need NCCL); use reduce_dtype float32")
    return missing


def apply_data_parallel(model: nn.Module, plan: Plan, mesh: DeviceMesh, device: torch.device,
                        ddp_class: type | None = None) -> nn.Module:
    """Wrap `model` (already tensor-parallel and checkpointed) for data parallelism; returns the model to train.

    ddp and zero1 return a `DistributedDataParallel` wrapper (parameter names gain a `module.` prefix), of
    `ddp_class` when given (a DDP subclass: pipeline stages, runtime/pipeline.py); zero2 and zero3 shard in
    place and return `model`.
    """
    kind = plan.data_parallel.kind
    if kind in DDP_KINDS:
        return _apply_ddp(model, plan, mesh, ddp_class)
    dp_mesh = data_parallel_mesh(plan, mesh)
    mp_policy = mixed_precision_policy(plan)
    reshard = False if kind == "zero2" else plan.data_parallel.reshard_after_forward
    offload = _offload_policy(plan, device)
    for group in _layer_groups(model, plan):
        fully_shard(group if len(group) > 1 else group[0], mesh=dp_mesh, reshard_after_forward=reshard,
                    mp_policy=mp_policy, offload_policy=offload)
    if plan.mesh.pp > 1 and mp_policy.param_dtype is not None:
        # a pipeline stage's outputs travel to the next stage into buffers traced in float32
        mp_policy = dataclasses.replace(mp_policy, output_dtype=torch.float32)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp_policy, offload_policy=offload)
    return model


def _apply_ddp(model: nn.Module, plan: Plan, mesh: DeviceMesh, ddp_class: type | None = None) -> nn.Module:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel = ddp_class or DistributedDataParallel  # noqa: N806
    tensor_parallel = plan.uses_tensor_parallel
    # gradients live in DDP's all-reduce buckets instead of beside them: one gradient copy, as the cost model says
    if tensor_parallel:
        wrapped = DistributedDataParallel(model, device_mesh=mesh["dp"], gradient_as_bucket_view=True)
    else:
        wrapped = DistributedDataParallel(model, process_group=mesh["dp"].get_group(), gradient_as_bucket_view=True)
    # DDP's forward hooks re-register tensor-parallel parameters as plain DTensor attributes, so after the first
    # forward `named_parameters()` no longer lists them: keep the names of the parameters DDP (and the optimizer)
    # hold, for checkpoints (runtime/checkpointing.py)
    wrapped.meshplan_parameters = list(model.named_parameters())
    reduce = plan.precision.reduce_dtype
    if reduce == "bfloat16":
        wrapped.register_comm_hook(mesh["dp"].get_group(), default_hooks.bf16_compress_hook)
    elif reduce == "float16":
        wrapped.register_comm_hook(mesh["dp"].get_group(), default_hooks.fp16_compress_hook)
    return wrapped


def build_optimizer(model: nn.Module, plan: Plan, mesh: DeviceMesh, learning_rate: float) -> torch.optim.Optimizer:
    """AdamW over the model's (sharded) parameters; for zero1 wrapped in ZeroRedundancyOptimizer over the dp
    shard group (all of dp without HSDP)."""
    if plan.data_parallel.kind == "zero1":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        dp_mesh = data_parallel_mesh(plan, mesh)
        shard_group = dp_mesh.get_group() if dp_mesh.ndim == 1 else dp_mesh["dp_shard"].get_group()
        return ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW,
                                       process_group=shard_group, lr=learning_rate)
    return torch.optim.AdamW(model.parameters(), lr=learning_rate)


def autocast_context(plan: Plan, device: torch.device) -> contextlib.AbstractContextManager:
    """ddp/zero1 compute in param_dtype under `torch.autocast` (fp32 weights); FSDP2 kinds cast via their policy."""
    if plan.data_parallel.kind not in DDP_KINDS or plan.precision.param_dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_torch_dtype(plan.precision.param_dtype))


def set_gradient_sync(model: nn.Module, plan: Plan, enabled: bool) -> None:
    """Turn the gradient all-reduce / reduce-scatter of the next backward on or off (gradient accumulation).

    FSDP2 kinds: `set_requires_gradient_sync` (unsharded gradients accumulate locally until the last
    micro-batch). ddp/zero1: DDP's `require_backward_grad_sync`, the flag `no_sync()` toggles.
    """
    if plan.data_parallel.kind in DDP_KINDS:
        model.require_backward_grad_sync = enabled
    else:
        model.set_requires_gradient_sync(enabled)
