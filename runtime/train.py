"""Train a model on this rank as a Plan says: build, shard, run AdamW steps, measure, and gather a report."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from planner.model_spec import ModelSpec, load_model_spec
from planner.plan import Plan
from planner.plan_schema import PlanError
from runtime.checkpointing import CheckpointOptions, load_checkpoint, save_checkpoint
from runtime.data_parallel import (
    DDP_KINDS,
    apply_data_parallel,
    autocast_context,
    build_optimizer,
    check_data_parallel_supported,
    set_gradient_sync,
)
from runtime.materialize import ParameterInit, build_spec_on_meta
from runtime.measure import PeakMemoryProbe
from runtime.memory_techniques import apply_activation_checkpointing, apply_activation_offload
from runtime.parallelize import apply_tensor_parallel, forward_context
from runtime.pipeline import PipelineParts, build_pipeline, check_pipeline_supported, pipeline_train_step
from runtime.preflight import check_machine_has_devices
from runtime.profiling import profile_step, profiled_step
from runtime.quiet import silence_known_torch_warnings
from runtime.sequence_parallel import apply_sequence_parallel
from runtime.tensor_parallel_2d import apply_tensor_parallel_2d, check_tensor_2d_supported
from runtime.vocab_parallel import apply_vocab_parallel, loss_context, loss_value
from runtime.watchdog import SETUP_STEP, Watchdog


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
    every_step_time_s: list[float] = field(default_factory=list)
    """Wall time of every step, warm-up and memory-tracked (slowed by MemTracker on CPU) steps included."""
    tracked_step: int = -1
    """The step whose peak memory was measured."""
    first_step: int = 0
    """The step `losses[0]` belongs to: 0, or the checkpoint's step when resumed."""
    machine_profile: dict | None = None
    """Rank 0 of a CPU run: the cluster profile measured inside the run after its steps (YAML form;
    `measure_machine`), which the report re-costs the plan on. None elsewhere or when switched off."""
    machine_profile_before: dict | None = None
    """The same, measured just before the timed steps (runs of 3 steps or more): the load of a shared host
    changes within seconds, so the report prices the plan on both and takes the geometric mean."""


def device_for(plan: Plan) -> torch.device:
    """This rank's device: its current GPU for a CUDA plan (refused, as preflight does, without one), else CPU."""
    if plan.cluster.get("device_type") == "cuda":
        check_machine_has_devices(plan, 1)
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_runtime_supports(plan: Plan) -> None:
    """Refuse, before any rank builds anything, plan features this runtime cannot run yet."""
    missing = []
    missing += check_data_parallel_supported(plan)
    if missing:
        raise PlanError("this runtime cannot run yet: " + "; ".join(missing))
    check_pipeline_supported(plan)
    check_tensor_2d_supported(plan)


def build_mesh(plan: Plan, device: torch.device) -> DeviceMesh:
    world = dist.get_world_size()
    if world != plan.world_size:
        raise PlanError(f"the plan is for world size {plan.world_size} but {world} ranks were started; "
                        f"launch with --nproc-per-node={plan.world_size} or re-plan for {world}")
    return init_device_mesh(device.type, (plan.mesh.pp, plan.mesh.dp, plan.mesh.tp),
                            mesh_dim_names=("pp", "dp", "tp"))


def build_parallel_model(plan: Plan, spec: ModelSpec, mesh: DeviceMesh, init: ParameterInit | None = None,
                         ) -> nn.Module:
    """Shard `spec.model` per the plan: tensor (1-D and 2-D, sequence, vocabulary) parallel over tp, activation
    checkpointing and offload per layer, then data parallelism over dp. Returns the module to train (a DDP
    wrapper for ddp and zero1, else `spec.model`).

    With `init`, `spec.model` lives on the meta device (runtime/materialize.py): its shards are allocated and
    filled after tensor parallelism and FSDP2 have sharded it (before DDP, which broadcasts real tensors)."""
    device = torch.device(mesh.device_type)
    apply_tensor_parallel(spec.model, plan, mesh["tp"])
    apply_tensor_parallel_2d(spec.model, plan, mesh["tp"])
    apply_vocab_parallel(spec.model, plan, mesh["tp"])
    apply_sequence_parallel(spec.model, plan, mesh["tp"])
    apply_activation_checkpointing(spec.model, plan)
    apply_activation_offload(spec.model, plan, device)
    if init is not None and plan.data_parallel.kind in DDP_KINDS:
        init.materialize(spec.model, device)
    model = apply_data_parallel(spec.model, plan, mesh, device)
    if init is not None and plan.data_parallel.kind not in DDP_KINDS:
        init.materialize(spec.model, torch.device("cpu") if plan.data_parallel.offload else device)
    return model


def build_model_spec(plan: Plan, device: torch.device, plan_dir: Path | None = None,
                     ) -> tuple[ModelSpec, ParameterInit | None]:
    """The plan's MODEL and how to materialise it (runtime/materialize.py).

    pp = 1 with a replayable init: on the meta device, with the init `build_parallel_model` uses to fill only
    this rank's shards. Pipelines trace a real model: built on the meta device and materialised whole here with
    the same init, so every plan starts from the same weights (init None). Models whose init cannot be replayed
    are built whole on `device` from the plan's seed (init None)."""
    spec, init = build_spec_on_meta(plan.model.source, plan.seed, base_dir=plan_dir)
    if init is None:
        torch.manual_seed(plan.seed)
        return load_model_spec(plan.model.source, base_dir=plan_dir, device=device), None
    if plan.mesh.pp > 1:
        init.materialize(spec.model, device)
        return spec, None
    return spec, init


def local_batch(spec: ModelSpec, step: int, dp_rank: int, dp: int, device: torch.device):
    """This rank's slice of the global batch for `step` (every tp rank of a dp group gets the same slice)."""
    inputs, targets = spec.make_batch(spec.global_batch_size, step)
    inputs = tuple(t.chunk(dp)[dp_rank].to(device) if isinstance(t, torch.Tensor) else t for t in inputs)
    return inputs, targets.chunk(dp)[dp_rank].to(device)


def forward_backward(model: nn.Module, spec: ModelSpec, plan: Plan, inputs, targets, device: torch.device,
                     next_microbatch: Callable[[], None] | None = None) -> torch.Tensor:
    """Forward and backward of this rank's batch in `plan.pipeline.num_microbatches` micro-batches (pp = 1).

    Each micro-batch loss is divided by the number of micro-batches, so the accumulated gradient is the
    gradient of the batch mean; gradient sync runs on the last micro-batch only. Returns the local batch loss
    (detached). `next_microbatch` runs before every micro-batch after the first (the memory probe's reset).
    """
    count = plan.pipeline.num_microbatches
    if targets.shape[0] % count:
        raise PlanError(f"this rank's batch of {targets.shape[0]} samples cannot be split into "
                        f"{count} micro-batches; choose num_microbatches dividing global batch / dp")
    micro_inputs = [t.chunk(count) if isinstance(t, torch.Tensor) else [t] * count for t in inputs]
    micro_targets = targets.chunk(count)
    total = None
    for index in range(count):
        if count > 1:
            set_gradient_sync(model, plan, index == count - 1)
        if index > 0 and next_microbatch is not None:
            next_microbatch()
        # backward inside both contexts: it multiplies saved plain tensors (rotary cos/sin) with DTensor
        # gradients, which needs the implicit replication the forward had; and a `vocab` head's loss and its
        # backward run on vocabulary-sharded logits under loss_parallel
        with loss_context(plan), forward_context(plan):
            with autocast_context(plan, device):
                loss = spec.loss_fn(model(*(t[index] for t in micro_inputs)), micro_targets[index])
            (loss / count).backward()
        value = loss_value(loss)
        part = value.to(torch.promote_types(value.dtype, torch.float32)) / count
        total = part if total is None else total + part
    return total


def train_step(model: nn.Module, spec: ModelSpec, optimizer: torch.optim.Optimizer, plan: Plan, inputs,
               targets, device: torch.device, next_microbatch: Callable[[], None] | None = None) -> torch.Tensor:
    """One forward/backward/AdamW step; returns the local loss (detached)."""
    loss = forward_backward(model, spec, plan, inputs, targets, device, next_microbatch)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def pipeline_model(parts: PipelineParts) -> nn.Module:
    """This rank's stage modules as one module to optimise and checkpoint (parameters `<index>.<FQN>`); it
    carries the parameters the stages train (`meshplan_parameters`, recorded before the first forward) for
    ddp / zero1 checkpoints (runtime/ddp_state.py), as a pp = 1 DDP wrapper does."""
    model = nn.ModuleList(parts.modules)
    model.meshplan_parameters = parts.indexed_named_parameters()
    return model


def pipelined_train_step(parts: PipelineParts, plan: Plan, optimizer: torch.optim.Optimizer, inputs, targets,
                         mesh: DeviceMesh) -> torch.Tensor:
    """One pipeline-schedule step over all micro-batches, then AdamW; returns this dp rank's batch loss."""
    loss = pipeline_train_step(parts, plan, inputs, targets, mesh)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def run_rank(plan: Plan, steps: int, plan_dir: Path | None = None,
             checkpoint: CheckpointOptions | None = None, watch: Watchdog | None = None) -> RankResult:
    """Run training steps 0 .. `steps` - 1 of `plan` on this rank (process group already initialised); with
    `checkpoint`, save every `checkpoint.every` steps and at the end, and with `checkpoint.resume` start from the
    latest checkpoint's step instead of 0 (runtime/checkpointing.py). `watch` is told every step and phase
    (runtime/watchdog.py: hang detection)."""
    enter = watch.enter if watch is not None else lambda step, phase: None
    silence_known_torch_warnings()  # runtime/quiet.py: torch's own deprecation noise, once per rank otherwise
    check_runtime_supports(plan)
    if checkpoint is not None:
        checkpoint.validate()
    device = device_for(plan)
    mesh = build_mesh(plan, device)
    spec, init = build_model_spec(plan, device, plan_dir)
    torch.manual_seed(plan.seed)  # dropout and other randomness in the step
    if spec.global_batch_size != plan.model.global_batch_size:
        raise PlanError(f"the plan was made for global batch {plan.model.global_batch_size}, the model now "
                        f"asks for {spec.global_batch_size}; re-plan")
    parts = None
    if plan.mesh.pp > 1:  # pipeline: this rank keeps and runs only its stages (runtime/pipeline.py)
        parts = build_pipeline(plan, spec, mesh, device)
        model = pipeline_model(parts)
    else:
        model = build_parallel_model(plan, spec, mesh, init)
    optimizer = build_optimizer(model, plan, mesh, spec.learning_rate)

    def step_once(inputs, targets, next_microbatch=None) -> torch.Tensor:
        if parts is not None:
            return pipelined_train_step(parts, plan, optimizer, inputs, targets, mesh)
        return train_step(model, spec, optimizer, plan, inputs, targets, device, next_microbatch)

    resumed = checkpoint is not None and checkpoint.resume
    enter(SETUP_STEP, "resume")
    start_step = load_checkpoint(checkpoint.directory, model, optimizer, plan, steps) if resumed else 0
    dp_rank, dp = mesh["dp"].get_local_rank(), plan.mesh.dp
    probe = PeakMemoryProbe(device)
    tracked_step = start_step + (1 if steps - start_step >= 3 else steps - start_step - 1)
    losses, times, every_time = [], [], []
    machine_before = None
    profiled = profiled_step(start_step, steps)  # --profile DIR (runtime/profiling.py)
    for step in range(start_step, steps):
        enter(step, "data")
        inputs, targets = local_batch(spec, step, dp_rank, dp, device)
        enter(step, "barrier")
        dist.barrier()
        enter(step, "step")
        start = time.perf_counter()
        with profile_step(step, profiled, dist.get_rank()):
            if step == tracked_step:
                with probe.track(model, optimizer, per_module=parts is None) as next_microbatch:
                    loss = step_once(inputs, targets, next_microbatch)
            else:
                loss = step_once(inputs, targets)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        every_time.append(elapsed)
        if step != tracked_step and (step > start_step or steps - start_step == 1):
            times.append(elapsed)
        enter(step, "loss all-reduce")
        dist.all_reduce(loss, group=mesh["dp"].get_group())
        losses.append(loss.item() / dp)
        if step == tracked_step and step + 1 < steps and tracked_step > start_step:
            enter(step, "measure machine")
            machine_before = measure_machine(plan, device)
        if checkpoint is not None and (step + 1 == steps or (checkpoint.every and (step + 1) % checkpoint.every == 0)):
            enter(step, "checkpoint")
            save_checkpoint(checkpoint.directory, step + 1, model, optimizer, plan)
    enter(steps, "measure machine")
    machine = measure_machine(plan, device) if steps > start_step else None
    return RankResult(rank=dist.get_rank(), losses=losses, step_times_s=times,
                      peak_memory_bytes=probe.result.peak_bytes,
                      memory_breakdown_bytes=probe.result.breakdown_bytes, every_step_time_s=every_time,
                      tracked_step=tracked_step, first_step=start_step,
                      machine_profile=machine if dist.get_rank() == 0 else None,
                      machine_profile_before=machine_before if dist.get_rank() == 0 else None)


MEASURE_MACHINE_ENV = "MESHPLAN_MEASURE_MACHINE"
"""Set to 0 to skip the in-run measurement of a CPU machine (`measure_machine`)."""


def measure_machine(plan: Plan, device: torch.device) -> dict | None:
    """A CPU plan's machine measured in this run (every rank calls it after the training steps): the plan's own
    cluster profile with compute, memory, per-op overhead and gloo collectives replaced by what these ranks
    measure now (costmodel.calibrate.measure_in_run, a second or two). On CPU processes the speed of a rank
    depends on how many processes share the cores at the moment, so the preset the plan was priced on cannot
    know it; the report re-costs the plan on this. None for GPU plans or with MESHPLAN_MEASURE_MACHINE=0."""
    if plan.cluster.get("device_type") != "cpu" or os.environ.get(MEASURE_MACHINE_ENV, "1") == "0":
        return None
    from costmodel import Cluster
    from costmodel.calibrate import measure_in_run

    base = Cluster.from_dict(plan.cluster, source="plan cluster")
    profile, _ = measure_in_run(base, device)
    return profile.to_dict()


def median_step_time_s(result: RankResult) -> float:
    return statistics.median(result.step_times_s) if result.step_times_s else float("nan")
