"""Train a model on this rank as a Plan says: build, shard, run AdamW steps, measure, and gather a report."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from planner.model_spec import ModelSpec, load_model_spec
from planner.plan import Plan
from planner.plan_schema import PlanError
from runtime.measure import PeakMemoryProbe
from runtime.parallelize import apply_data_parallel, apply_tensor_parallel, forward_context
from runtime.pipeline import PipelineParts, build_pipeline, check_pipeline_supported, pipeline_train_step


@dataclass
class RankResult:
    """What one rank measured."""

    rank: int
    losses: list[float]
    """Loss of each step, averaged over the data-parallel ranks (the global-batch loss)."""
    step_times_s: list[float]
    """Wall time of each timed step (the warm-up step and the memory-tracked step are not timed)."""
    peak_memory_bytes: int
    memory_breakdown_bytes: dict[str, int] = field(default_factory=dict)


def device_for(plan: Plan) -> torch.device:
    if plan.cluster.get("device_type") == "cuda":
        if not torch.cuda.is_available():
            raise PlanError(f"the plan targets CUDA devices ({plan.cluster.get('name')}) but this machine has "
                            "none; plan for the 'cpu' cluster to run on CPU processes")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_runtime_supports(plan: Plan) -> None:
    """Refuse, before any rank builds anything, plan features this runtime cannot run yet."""
    missing = []
    # with dp = 1 every kind is the same (nothing to replicate or shard): FSDP2 over one rank runs it
    if (plan.data_parallel.kind != "zero3" and plan.mesh.dp > 1) or plan.data_parallel.replicate > 1 \
            or plan.data_parallel.offload:
        missing.append(f"data_parallel {plan.data_parallel}")
    if plan.precision.param_dtype != "float32" or plan.precision.reduce_dtype != "float32":
        missing.append(f"mixed precision {plan.precision}")
    if plan.mesh.pp == 1 and plan.pipeline.num_microbatches > 1:
        missing.append(f"gradient accumulation ({plan.pipeline.num_microbatches} micro-batches)")
    for layer in plan.layers:
        if layer.checkpoint != "none" or layer.offload_activations or layer.sequence_parallel:
            missing.append(f"layer {layer.path}: checkpoint={layer.checkpoint}, offload_activations="
                           f"{layer.offload_activations}, sequence_parallel={layer.sequence_parallel}")
    if missing:
        raise PlanError("this runtime cannot run yet: " + "; ".join(missing))
    check_pipeline_supported(plan)


def build_mesh(plan: Plan, device: torch.device) -> DeviceMesh:
    world = dist.get_world_size()
    if world != plan.world_size:
        raise PlanError(f"the plan is for world size {plan.world_size} but {world} ranks were started; "
                        f"launch with --nproc-per-node={plan.world_size} or re-plan for {world}")
    return init_device_mesh(device.type, (plan.mesh.pp, plan.mesh.dp, plan.mesh.tp),
                            mesh_dim_names=("pp", "dp", "tp"))


def build_parallel_model(plan: Plan, spec: ModelSpec, mesh: DeviceMesh) -> nn.Module:
    """Shard `spec.model` in place per the plan: tensor parallel over tp, then FSDP2 over dp."""
    apply_tensor_parallel(spec.model, plan, mesh["tp"])
    apply_data_parallel(spec.model, plan, mesh["dp"])
    return spec.model


def local_batch(spec: ModelSpec, step: int, dp_rank: int, dp: int, device: torch.device):
    """This rank's slice of the global batch for `step` (every tp rank of a dp group gets the same slice)."""
    inputs, targets = spec.make_batch(spec.global_batch_size, step)
    inputs = tuple(t.chunk(dp)[dp_rank].to(device) if isinstance(t, torch.Tensor) else t for t in inputs)
    return inputs, targets.chunk(dp)[dp_rank].to(device)


def train_step(model: nn.Module, spec: ModelSpec, optimizer: torch.optim.Optimizer, plan: Plan, inputs,
               targets) -> torch.Tensor:
    """One forward/backward/AdamW step; returns the local loss (detached)."""
    with forward_context(plan):
        loss = spec.loss_fn(model(*inputs), targets)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def pipelined_train_step(parts: PipelineParts, plan: Plan, optimizer: torch.optim.Optimizer, inputs, targets,
                         mesh: DeviceMesh) -> torch.Tensor:
    """One pipeline-schedule step over all micro-batches, then AdamW; returns this dp rank's batch loss."""
    loss = pipeline_train_step(parts, plan, inputs, targets, mesh)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def run_rank(plan: Plan, steps: int, plan_dir: Path | None = None) -> RankResult:
    """Run `steps` training steps of `plan` on this rank (process group already initialised)."""
    check_runtime_supports(plan)
    device = device_for(plan)
    mesh = build_mesh(plan, device)
    torch.manual_seed(plan.seed)
    spec = load_model_spec(plan.model.source, base_dir=plan_dir, device=device)
    if spec.global_batch_size != plan.model.global_batch_size:
        raise PlanError(f"the plan was made for global batch {plan.model.global_batch_size}, the model now "
                        f"asks for {spec.global_batch_size}; re-plan")
    parts = None
    if plan.mesh.pp > 1:  # pipeline: this rank keeps and runs only its stages (runtime/pipeline.py)
        parts = build_pipeline(plan, spec, mesh, device)
        model = nn.ModuleList(parts.modules)
    else:
        model = build_parallel_model(plan, spec, mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate)

    def step_once(inputs, targets) -> torch.Tensor:
        if parts is not None:
            return pipelined_train_step(parts, plan, optimizer, inputs, targets, mesh)
        return train_step(model, spec, optimizer, plan, inputs, targets)

    dp_rank, dp = mesh["dp"].get_local_rank(), plan.mesh.dp
    probe = PeakMemoryProbe(device)
    tracked_step = 1 if steps >= 3 else steps - 1
    losses, times = [], []
    for step in range(steps):
        inputs, targets = local_batch(spec, step, dp_rank, dp, device)
        dist.barrier()
        start = time.perf_counter()
        if step == tracked_step:
            with probe.track(model, optimizer):
                loss = step_once(inputs, targets)
        else:
            loss = step_once(inputs, targets)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if step != tracked_step and (step > 0 or steps == 1):
            times.append(elapsed)
        dist.all_reduce(loss, group=mesh["dp"].get_group())
        losses.append(loss.item() / dp)
    return RankResult(rank=dist.get_rank(), losses=losses, step_times_s=times,
                      peak_memory_bytes=probe.result.peak_bytes,
                      memory_breakdown_bytes=probe.result.breakdown_bytes)


def median_step_time_s(result: RankResult) -> float:
    return statistics.median(result.step_times_s) if result.step_times_s else float("nan")
