"""Run under torchrun: train each given plan with the runtime's own step (`runtime.train.forward_backward`, then
the runtime's optimizer) and, in the same process, an unsharded single-process reference from the same seed;
write the largest differences (loss, gradients, parameters) per plan as JSON, with rank 0's peak memory
of the second step's forward and backward (MemTracker, by category).

    torchrun --nproc-per-node=4 tests/parity_worker.py out.json STEPS DTYPE plan1.yaml [plan2.yaml ...]

Several plans share one launch because starting the processes costs more than a few steps of a tiny model.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from planner.plan import Plan
from runtime.data_parallel import DDP_KINDS, build_optimizer
from runtime.materialize import build_reference
from runtime.measure import PeakMemoryProbe
from runtime.train import (
    build_mesh,
    build_model_spec,
    build_parallel_model,
    device_for,
    forward_backward,
    local_batch,
)


def full(t: torch.Tensor, spec=None) -> torch.Tensor:
    """The whole tensor: DTensors are gathered; local shards of tensor-parallel parameters under DDP (tagged
    `_st_info` by `_pre_dp_module_transform`) are rebuilt as DTensors first."""
    if spec is not None and not isinstance(t, DTensor):
        t = DTensor.from_local(t, spec.mesh, spec.placements, run_check=False, shape=spec.shape, stride=spec.stride)
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_numel(p: torch.Tensor) -> int:
    return p.to_local().numel() if isinstance(p, DTensor) else p.numel()


class LargestTensorProbe(TorchDispatchMode):
    """The most elements of any real (not meta) tensor an op returns while active: for a DTensor, its local
    shard. Run around building the sharded model, it shows whether a rank ever made a full parameter."""

    def __init__(self):
        super().__init__()
        self.largest_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                local = t._local_tensor if isinstance(t, DTensor) else t
                if local.device.type != "meta":
                    self.largest_numel = max(self.largest_numel, local.numel())
        return out


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / max(|b|, 1e-6). The floor is for tensors that are zero in exact arithmetic: an attention key
    bias has a zero gradient (softmax cancels it), so its computed gradient is rounding noise (~1e-17), Adam
    turns that noise into ~1e-12 updates, and relative differences of noise mean nothing. A real error (a
    missing reduction) is as large as the tensor itself, so it still shows as O(1) above the floor."""
    return ((a.to(b.dtype) - b).norm() / b.norm().clamp_min(1e-6)).item()


def tensor_parallel_dim(p: torch.Tensor) -> int | list | None:
    """The dim a parameter is sharded on over the mesh's `tp` axis (None when not sharded there), or for a
    tensor2d grid the list [dim over the rows, dim over the columns]; local shards under DDP are read through
    their `_st_info`."""
    spec = p if isinstance(p, DTensor) else getattr(p, "_st_info", None)
    if spec is None:
        return None
    mesh, placements = (spec.device_mesh, spec.placements) if isinstance(spec, DTensor) else (spec.mesh,
                                                                                              spec.placements)
    names = mesh.mesh_dim_names or ()
    grid = [index for index, name in enumerate(names) if name.startswith(("tp_rows", "tp_cols"))]
    if grid:  # a tensor2d grid (runtime/tensor_parallel_2d.py): the dims over its rows and its columns
        return [placements[index].dim if placements[index].is_shard() else None for index in grid]
    if "tp" not in names:
        return None
    placement = placements[names.index("tp")]
    return placement.dim if placement.is_shard() else None


def model_parameters(model: torch.nn.Module):
    """(name, parameter) with the DDP wrapper's `module.` prefix removed, so names match the reference."""
    for name, p in model.named_parameters():
        yield name.removeprefix("module."), p


def has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


def batchnorm_reference_forward_backward(reference, plan: Plan, inputs, targets, dp_rank: int) -> torch.Tensor:
    """BatchNorm in training mode normalises with the statistics of the batch it sees: under data parallelism
    each dp rank's slice, and with micro-batches (gradient accumulation, pipelines) each micro-batch of it
    (torch's SyncBatchNorm would use the global batch, but it refuses CPU tensors). So the reference runs each
    micro-batch of each dp slice through the model separately and averages the gradients, as the ranks do; its
    running statistics are updated by this rank's micro-batches only (the other slices' updates are undone), as
    this rank's are under FSDP2 (DDP instead broadcasts rank 0's buffers before each forward)."""
    dp, count = plan.mesh.dp, plan.pipeline.num_microbatches
    losses = []
    for index in range(dp):
        kept = None if index == dp_rank else [(b, b.clone()) for b in reference.model.buffers()]
        slice_inputs, slice_targets = [t.chunk(dp)[index] for t in inputs], targets.chunk(dp)[index]
        for micro in range(count):
            loss = reference.loss_fn(reference.model(*(t.chunk(count)[micro] for t in slice_inputs)),
                                     slice_targets.chunk(count)[micro])
            (loss / (dp * count)).backward()
            losses.append(loss.detach())
        for buffer, value in kept or []:
            buffer.copy_(value)
    return torch.stack(losses).mean()


def reference_forward_backward(reference, plan: Plan, step: int, dp_rank: int = 0) -> torch.Tensor:
    """The single-process reference: the global batch in one go, or, under mixed precision, the same
    low-precision semantics as the runtime on each dp rank's slice with gradients averaged in fp32.

    ddp and zero1 run the fp32 model under `torch.autocast`; the FSDP2 kinds run a copy of the model cast to
    param_dtype (what `MixedPrecisionPolicy` all-gathers) and reduce its gradients in fp32.
    """
    inputs, targets = reference.make_batch(reference.global_batch_size, step)
    if (plan.mesh.dp > 1 or plan.pipeline.num_microbatches > 1) and has_batchnorm(reference.model):
        return batchnorm_reference_forward_backward(reference, plan, inputs, targets, dp_rank)
    if plan.precision.param_dtype == "float32":  # full precision: the default dtype (float64 tests too)
        loss = reference.loss_fn(reference.model(*inputs), targets)
        loss.backward()
        return loss.detach()
    param_dtype = getattr(torch, plan.precision.param_dtype)
    dp = plan.mesh.dp
    losses = []
    for index in range(dp):
        shard_inputs = tuple(t.chunk(dp)[index] for t in inputs)
        if plan.data_parallel.kind in DDP_KINDS:
            with torch.autocast("cpu", dtype=param_dtype):
                loss = reference.loss_fn(reference.model(*shard_inputs), targets.chunk(dp)[index])
            (loss / dp).backward()
        else:
            low = copy.deepcopy(reference.model).to(param_dtype)
            loss = reference.loss_fn(low(*shard_inputs), targets.chunk(dp)[index])
            loss.backward()
            for p, p_low in zip(reference.model.parameters(), low.parameters(), strict=True):
                grad = p_low.grad.to(p.dtype) / dp
                p.grad = grad if p.grad is None else p.grad + grad
        losses.append(loss.detach().float())
    return torch.stack(losses).mean()


def load_plan_and_reference(plan_path: str):
    """(plan, device, mesh, spec to shard, its init, single-process reference spec), both from the plan's seed:
    the spec as the runtime builds it (on the meta device when it materialises shards only), the reference
    whole with the same initial weights (runtime/materialize.py)."""
    plan = Plan.load(plan_path)
    device = device_for(plan)
    mesh = build_mesh(plan, device)
    spec, init = build_model_spec(plan, device, Path(plan_path).parent)
    reference = build_reference(plan.model.source, plan.seed, Path(plan_path).parent)
    return plan, device, mesh, spec, init, reference


def run_plan(plan_path: str, steps: int) -> dict:
    if Plan.load(plan_path).mesh.pp > 1:  # pipelines: each rank holds only its stages
        from pipeline_parity_worker import compare_plan

        return compare_plan(plan_path, steps)
    plan, device, mesh, spec, init, reference = load_plan_and_reference(plan_path)
    with LargestTensorProbe() as probe_build:
        model = build_parallel_model(plan, spec, mesh, init)
    largest_built = torch.tensor(probe_build.largest_numel)
    dist.all_reduce(largest_built, op=dist.ReduceOp.MAX)  # over every rank
    # taken before the first forward: DDP's tensor-parallel path (_pre_dp_module_transform) swaps the local
    # Parameters it trains for plain DTensor attributes in every forward, so model.named_parameters() afterwards
    # no longer lists the tensor-parallel ones
    named_params = list(model_parameters(model))
    opt = build_optimizer(model, plan, mesh, spec.learning_rate)
    ref_opt = torch.optim.AdamW(reference.model.parameters(), lr=spec.learning_rate)
    dp_rank = mesh["dp"].get_local_rank()
    probe = PeakMemoryProbe(device)
    worst = {"loss": 0.0, "grad": 0.0, "param": 0.0}
    first_step_grad = 0.0
    worst_names = {"grad": "", "param": ""}
    losses = []
    ref_params = dict(reference.model.named_parameters())
    for step in range(steps):
        inputs, targets = local_batch(spec, step, dp_rank, plan.mesh.dp, device)
        with probe.track(model, opt) if step == 1 else contextlib.nullcontext(None) as next_microbatch:
            global_loss = forward_backward(model, spec, plan, inputs, targets, device, next_microbatch)
        ref_loss = reference_forward_backward(reference, plan, step, dp_rank)
        dist.all_reduce(global_loss, group=mesh["dp"].get_group())
        global_loss /= plan.mesh.dp
        losses.append((global_loss.item(), ref_loss.item()))
        worst["loss"] = max(worst["loss"], abs(global_loss.item() - ref_loss.item()) / abs(ref_loss.item()))
        for name, p in named_params:
            diff = rel_diff(full(p.grad, getattr(p, "_st_info", None)), ref_params[name].grad)
            if diff > worst["grad"]:
                worst["grad"], worst_names["grad"] = diff, f"{name} at step {step}"
            if step == 0:  # from identical parameters: only the order of reductions differs
                first_step_grad = max(first_step_grad, diff)
        opt.step()
        opt.zero_grad()
        ref_opt.step()
        ref_opt.zero_grad()
    for name, p in named_params:
        diff = rel_diff(full(p.detach(), getattr(p, "_st_info", None)), ref_params[name].detach())
        if diff > worst["param"]:
            worst["param"], worst_names["param"] = diff, name
    ref_buffers = dict(reference.model.named_buffers())
    for name, b in model.named_buffers():  # BatchNorm running statistics, rotary tables
        name = name.removeprefix("module.")
        if name in ref_buffers and b.is_floating_point() and plan.data_parallel.kind not in DDP_KINDS:
            diff = rel_diff(full(b), ref_buffers[name])
            if diff > worst.setdefault("buffer", 0.0):
                worst["buffer"], worst_names["buffer"] = diff, name
    tp_shards = {name: dim for name, p in named_params if (dim := tensor_parallel_dim(p)) is not None}
    return {"worst": worst, "where": worst_names, "losses": losses, "tp_shards": tp_shards,
            "first_step_grad": first_step_grad,
            "largest_tensor_built_numel": int(largest_built), "materialized_shards_only": init is not None,
            "local_parameter_numel": sum(local_numel(p) for _, p in named_params),
            "not_compared": sorted(set(ref_params) - {name for name, _ in named_params}),
            "memory_bytes": {"peak": probe.result.peak_bytes, **probe.result.breakdown_bytes}}


def main() -> None:
    out_path, steps = sys.argv[1], int(sys.argv[2])
    torch.set_default_dtype(getattr(torch, sys.argv[3]))
    dist.init_process_group("gloo")
    results = {plan_path: run_plan(plan_path, steps) for plan_path in sys.argv[4:]}
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results))
    gc.collect()  # free sharded models (FSDP2/DDP keep reference cycles) while their process groups live;
    # otherwise gloo work objects can die in interpreter teardown (SIGABRT, pytorch/pytorch#179291)
    dist.barrier()  # no rank tears gloo down while a peer still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
