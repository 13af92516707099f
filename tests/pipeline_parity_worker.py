"""Run under torchrun: train pipeline plans with the runtime and, in the same process, an unsharded
single-process reference from the same seed; write the largest differences (loss, gradients, parameters) per
plan as JSON. Several plans for the same world size share one launch (start-up dominates the cost).

    torchrun --nproc-per-node=N tests/pipeline_parity_worker.py out.json STEPS DTYPE:plan1.yaml [DTYPE:plan2.yaml ...]

Each rank holds only its stages' parameters, so every rank compares its own against the reference by FQN and
the worst differences are gathered; the union of compared names must cover every reference parameter. Also
reported: parameters of other stages still alive on a rank (must be none), and parameters whose tensor-parallel
sharding differs from what the plan's `tensor` layers ask for (must be none).
"""

from __future__ import annotations

import gc
import json
import sys
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
from parity_worker import full, load_plan_and_reference, reference_forward_backward, rel_diff
from torch.distributed.tensor import DTensor

from planner.plan import Plan
from runtime.data_parallel import build_optimizer
from runtime.pipeline import build_pipeline, pipeline_train_step
from runtime.train import local_batch, pipeline_model


def layer_of(plan: Plan, name: str) -> str:
    return max((layer.path for layer in plan.layers if name.startswith(layer.path + ".")), key=len)


def tp_sharded_names(plan: Plan, names: set[str]) -> set[str]:
    """Parameters the plan shards over tp: colwise weights and biases, rowwise weights of `tensor` layers; every
    weight and bias of a `tensor2d` layer's units (biases over the grid's columns); the weight of a `vocab`
    layer (on the vocabulary)."""
    if plan.mesh.tp == 1:
        return set()
    wanted = set()
    for layer in plan.layers:
        if layer.strategy == "tensor2d":
            for unit in layer.tensor_parallel:
                for rel in [*unit.colwise, unit.rowwise]:
                    wanted |= {f"{layer.path}.{rel}.weight", f"{layer.path}.{rel}.bias"}
        if layer.strategy == "vocab":
            wanted.add(f"{layer.path}.weight")
        if layer.strategy == "tensor":
            for unit in layer.tensor_parallel:
                for col in unit.colwise:
                    wanted |= {f"{layer.path}.{col}.weight", f"{layer.path}.{col}.bias"}
                wanted.add(f"{layer.path}.{unit.rowwise}.weight")
    return wanted & names


def is_tp_sharded(p: torch.Tensor) -> bool:
    """Sharded over the mesh's `tp` axis, or over an axis of a tensor2d grid (runtime/tensor_parallel_2d.py);
    a local shard under DDP (ddp / zero1 stages) is read through its `_st_info`."""
    spec = getattr(p, "_st_info", None)
    if isinstance(p, DTensor):
        names, placements = p.device_mesh.mesh_dim_names or (), p.placements
    elif spec is not None:
        names, placements = spec.mesh.mesh_dim_names or (), spec.placements
    else:
        return False
    return any(placement.is_shard() for name, placement in zip(names, placements, strict=True)
               if name == "tp" or name.startswith(("tp_rows", "tp_cols")))


def compare_plan(plan_path: str, steps: int) -> dict:
    """Train `plan_path` and its reference for `steps` AdamW steps; worst differences over all ranks."""
    plan, device, mesh, spec, _, reference = load_plan_and_reference(plan_path)
    originals = {name: weakref.ref(p) for name, p in spec.model.named_parameters()}
    parts = build_pipeline(plan, spec, mesh, device)
    gc.collect()
    local_layers = {layer.path for layer in plan.layers if layer.stage in parts.stage_ids}
    kept_elsewhere = [name for name, ref in originals.items()
                      if ref() is not None and layer_of(plan, name) not in local_layers]
    names = {name for name, _ in parts.named_parameters()}
    tp_sharded = {n for n, p in parts.named_parameters() if is_tp_sharded(p)}
    tp_mismatch = sorted(tp_sharded_names(plan, names) ^ tp_sharded)
    opt = build_optimizer(pipeline_model(parts), plan, mesh, spec.learning_rate)  # ZeroRedundancyOptimizer: zero1
    ref_opt = torch.optim.AdamW(reference.model.parameters(), lr=spec.learning_rate)
    ref_params = dict(reference.model.named_parameters())
    dp_rank = mesh["dp"].get_local_rank()
    worst = {"loss": 0.0, "grad": 0.0, "param": 0.0}
    where = {"grad": "", "param": ""}
    losses = []
    for step in range(steps):
        inputs, targets = local_batch(spec, step, dp_rank, plan.mesh.dp, device)
        loss = pipeline_train_step(parts, plan, inputs, targets, mesh)
        dist.all_reduce(loss, group=mesh["dp"].get_group())
        loss = loss.item() / plan.mesh.dp
        ref_loss = reference_forward_backward(reference, plan, step, dp_rank)  # per micro-batch for BatchNorm
        losses.append((loss, ref_loss.item()))
        worst["loss"] = max(worst["loss"], abs(loss - ref_loss.item()) / abs(ref_loss.item()))
        for name, p in parts.named_parameters():
            diff = rel_diff(full(p.grad, getattr(p, "_st_info", None)), ref_params[name].grad)
            if diff > worst["grad"]:
                worst["grad"], where["grad"] = diff, f"{name} at step {step}"
        opt.step()
        opt.zero_grad()
        ref_opt.step()
        ref_opt.zero_grad()
    for name, p in parts.named_parameters():
        diff = rel_diff(full(p.detach(), getattr(p, "_st_info", None)), ref_params[name].detach())
        if diff > worst["param"]:
            worst["param"], where["param"] = diff, name
    ref_buffers = dict(reference.model.named_buffers())
    worst["buffer"] = 0.0
    for module in parts.modules:  # BatchNorm running statistics, kept by the stage that runs the norm
        for name, b in module.named_buffers():
            if name in ref_buffers and b.is_floating_point():
                diff = rel_diff(full(b), ref_buffers[name])
                if diff > worst["buffer"]:
                    worst["buffer"], where["buffer"] = diff, name
    mine = {"worst": worst, "where": where, "losses": losses, "names": [n for n, _ in parts.named_parameters()],
            "kept_elsewhere": kept_elsewhere, "tp_mismatch": tp_mismatch,
            "tp_sharded": sorted(tp_sharded), "stage_ids": parts.stage_ids,
            "dtensors": sorted(n for n, p in parts.named_parameters() if isinstance(p, DTensor))}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    result = {"worst": {}, "where": {}, "losses": [r["losses"] for r in gathered],
              "kept_elsewhere": sorted({n for r in gathered for n in r["kept_elsewhere"]}),
              "tp_mismatch": sorted({n for r in gathered for n in r["tp_mismatch"]}),
              "tp_sharded": len({n for r in gathered for n in r["tp_sharded"]}),
              "stage_ids": [r["stage_ids"] for r in gathered],
              "dtensors": sorted({n for r in gathered for n in r["dtensors"]}),
              "missing": sorted(set(ref_params) - {n for r in gathered for n in r["names"]})}
    for quantity in worst:
        top = max(gathered, key=lambda r, q=quantity: r["worst"][q])
        result["worst"][quantity] = top["worst"][quantity]
        result["where"][quantity] = top["where"].get(quantity, "")
    return result


def main() -> None:
    out_path, steps, runs = sys.argv[1], int(sys.argv[2]), [arg.split(":", 1) for arg in sys.argv[3:]]
    dist.init_process_group("gloo")
    results = {}
    for dtype, path in runs:
        torch.set_default_dtype(getattr(torch, dtype))
        results[f"{Path(path).stem}-{dtype}"] = compare_plan(path, steps)
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results))
    dist.barrier()  # no rank tears gloo down while a peer still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
