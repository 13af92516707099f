"""Run under torchrun: train a plan with the runtime and, in the same process, an unsharded single-process
reference from the same seed; write the largest differences (loss, gradients, parameters) as JSON.

    torchrun --nproc-per-node=4 tests/parity_worker.py plan.yaml out.json STEPS DTYPE
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from planner.model_spec import load_model_spec
from planner.plan import Plan
from runtime.parallelize import forward_context
from runtime.train import build_mesh, build_parallel_model, device_for, local_batch


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def main() -> None:
    plan_path, out_path, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_default_dtype(getattr(torch, sys.argv[4]))
    plan = Plan.load(plan_path)
    dist.init_process_group("gloo")
    device = device_for(plan)
    mesh = build_mesh(plan, device)
    torch.manual_seed(plan.seed)
    spec = load_model_spec(plan.model.source, base_dir=Path(plan_path).parent)
    torch.manual_seed(plan.seed)
    reference = load_model_spec(plan.model.source, base_dir=Path(plan_path).parent)
    model = build_parallel_model(plan, spec, mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate)
    ref_opt = torch.optim.AdamW(reference.model.parameters(), lr=spec.learning_rate)
    dp_rank = mesh["dp"].get_local_rank()
    worst = {"loss": 0.0, "grad": 0.0, "param": 0.0}
    worst_names = {"grad": "", "param": ""}
    losses = []
    for step in range(steps):
        inputs, targets = local_batch(spec, step, dp_rank, plan.mesh.dp, device)
        with forward_context(plan):
            loss = spec.loss_fn(model(*inputs), targets)
        loss.backward()
        ref_inputs, ref_targets = reference.make_batch(spec.global_batch_size, step)
        ref_loss = reference.loss_fn(reference.model(*ref_inputs), ref_targets)
        ref_loss.backward()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss, group=mesh["dp"].get_group())
        global_loss /= plan.mesh.dp
        losses.append((global_loss.item(), ref_loss.item()))
        worst["loss"] = max(worst["loss"], abs(global_loss.item() - ref_loss.item()) / abs(ref_loss.item()))
        ref_params = dict(reference.model.named_parameters())
        for name, p in model.named_parameters():
            diff = rel_diff(full(p.grad), ref_params[name].grad)
            if diff > worst["grad"]:
                worst["grad"], worst_names["grad"] = diff, f"{name} at step {step}"
        opt.step()
        opt.zero_grad()
        ref_opt.step()
        ref_opt.zero_grad()
    ref_params = dict(reference.model.named_parameters())
    for name, p in model.named_parameters():
        diff = rel_diff(full(p.detach()), ref_params[name].detach())
        if diff > worst["param"]:
            worst["param"], worst_names["param"] = diff, name
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps({"worst": worst, "where": worst_names, "losses": losses}))
    dist.barrier()  # no rank tears gloo down while a peer still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
