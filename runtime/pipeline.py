"""Pipeline parallelism: cut the model into the plan's stages, shard each stage, and train with a schedule.

The cut uses the tracer frontend of `torch.distributed.pipelining`: `pipeline(model, micro_batch_inputs,
split_spec={path: SplitPoint.BEGINNING})` exports the whole forward with torch.export (so any root forward
works, e.g. GPT's `x = wte(idx) + wpe(arange)`: root-level ops land on the stage where they run) and splits
it before the first layer of every stage. Each stage module keeps the module hierarchy and parameter FQNs
(`blocks.2.attn.q.weight`), so the plan's layer paths apply to it unchanged: tensor, sequence and vocabulary
parallel over `tp` (DTensor styles for the traced linears, embeddings and norms; what a module *was* is read
from the model before tracing), then data parallel over `dp` (runtime/data_parallel.py), then
`Pipe.build_stage` wraps it for the schedule. Values a stage takes from a stage further back (Llama's rotary
tables) are relayed through the stages between (runtime/stage_relay.py).

Data parallelism per stage (each stage's dp group is the dp ranks of its pipeline rank):
- zero2 / zero3 (HSDP too): FSDP2 `fully_shard` shards the stage module in place; the schedule's FSDP hooks
  (`set_requires_gradient_sync(False)` per micro-batch, `perform_reduce_grad` after the last) reduce-scatter once.
- ddp / zero1: the stage module is wrapped in the same `DistributedDataParallel` the pp = 1 path builds
  (`_apply_ddp`), and the wrapper becomes the stage's `submod`. torch.distributed.pipelining knows DDP stages:
  it runs every forward and every backward but the last under `no_sync()`, and before the last backward calls
  `reducer.prepare_for_backward`, so DDP's bucketed all-reduce runs once per step, during the last micro-batch's
  backward (accumulated gradients, no reduction per micro-batch). The stage reads its graph from `submod.graph`,
  which a DDP wrapper lacks: `_StageDDP` forwards it. DDP's tensor-parallel path hides the DTensor parameters
  from `parameters()` after the first forward, so the schedule's own gradient scaling (which walks
  `submod.parameters()`) would miss them: for DDP kinds the schedule runs with `scale_grads=False` and
  `pipeline_train_step` divides the gradients of the parameters recorded at build time by num_microbatches.
  zero1's ZeroRedundancyOptimizer is built by `build_optimizer` over the stage parameters, sharded over the
  stage's dp group (the dp_shard group with HSDP), as for pp = 1.

Vocabulary: stage = one contiguous run of the layer chain (0 .. pp x virtual_stages - 1); stage s runs on
pipeline rank s % pp (the looped layout `ScheduleInterleaved1F1B` expects; with one stage per rank, s = rank).

Blind spots: every rank builds the full model once from the shared seed (so the weights equal a single
process's) and then drops all but its stages; the export bakes the micro-batch shape into the graph, so
every micro-batch must have the plan's micro-batch size; a parameter shared by two stages (tied embedding
and head) is refused, since the tracer would copy it and the copies' gradients would never be summed; so is a
model input used past the first stage (only stage 0 receives the inputs).
"""

from __future__ import annotations

import dataclasses
import gc
import operator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    SplitPoint,
    pipeline,
)
from torch.distributed.pipelining.schedules import _PipelineSchedule
from torch.distributed.pipelining.stage import _PipelineStageBase
from torch.nn.parallel import DistributedDataParallel
from torch.utils._pytree import tree_map_only

from planner.model_spec import ModelSpec
from planner.plan import Plan
from planner.plan_schema import PlanError
from runtime.data_parallel import DDP_KINDS, apply_data_parallel, autocast_context
from runtime.memory_techniques import apply_activation_checkpointing, apply_activation_offload
from runtime.parallelize import apply_tensor_parallel, forward_context
from runtime.sequence_parallel import apply_sequence_parallel, sequence_local_modules
from runtime.stage_relay import (
    make_boundaries_contiguous,
    order_inputs_as_sent,
    produced_value,
    relay_skipping_values,
)
from runtime.tensor_parallel_2d import apply_tensor_parallel_2d
from runtime.vocab_parallel import apply_vocab_parallel, check_vocab_layers, loss_context, loss_value

SCHEDULE_CLASSES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}


@dataclass
class PipelineParts:
    """This rank's share of a pipelined model."""

    stage_ids: list[int]
    """Stages that run on this rank, in order."""
    modules: list[nn.Module]
    """Their (sharded) stage modules, unwrapped (not the DDP wrapper); parameters keep the original FQNs."""
    schedule: _PipelineSchedule
    has_first: bool
    """This rank runs stage 0 and feeds the model inputs."""
    has_last: bool
    """This rank runs the last stage, where the loss is computed."""
    stage_parameters: list[list[tuple[str, nn.Parameter]]] = dataclasses.field(default_factory=list)
    """Per stage, (FQN, parameter) as the stage trains them, recorded before the first forward: under DDP's
    tensor-parallel path the local shards tagged `_st_info`, which `named_parameters()` stops listing."""
    grad_divisor: int = 1
    """What `pipeline_train_step` divides the gradients by after the schedule (num_microbatches when the
    schedule does not scale them itself: DDP kinds)."""

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [item for named in self.stage_parameters for item in named]

    def indexed_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(FQN, parameter) with the stage's index in `modules` in front (`0.blocks.2.w`), as an
        `nn.ModuleList(modules)` names them."""
        return [(f"{index}.{name}", p) for index, named in enumerate(self.stage_parameters) for name, p in named]


class _StageDDP(DistributedDataParallel):
    """DDP over a pipeline stage's GraphModule; the pipeline stage reads the module's graph as `submod.graph`
    (its placeholders and output), which plain DDP does not have."""

    @property
    def graph(self) -> torch.fx.Graph:
        return self.module.graph


def stage_ids_on_rank(plan: Plan, pp_rank: int) -> list[int]:
    """Stages pipeline rank `pp_rank` runs: pp_rank, pp_rank + pp, ... (looped over virtual stages)."""
    return list(range(pp_rank, plan.num_stages, plan.mesh.pp))


def split_spec_for(plan: Plan) -> dict[str, SplitPoint]:
    """A split before the first layer of every stage after the first."""
    spec = {}
    for previous, layer in zip(plan.layers, plan.layers[1:], strict=False):
        if layer.stage != previous.stage:
            if not layer.path:
                raise PlanError(f"layer <root> is on stage {layer.stage}: a pipeline can only cut between "
                                "named layers of the chain; give every layer a module path")
            spec[layer.path] = SplitPoint.BEGINNING
    return spec


def check_pipeline_supported(plan: Plan) -> None:
    """Refuse, before any rank builds anything, pipeline plans this runtime cannot run."""
    if plan.mesh.pp == 1:
        return
    split_spec_for(plan)


def check_micro_batching(plan: Plan, spec: ModelSpec) -> None:
    """Refuse micro-batch counts the schedule cannot run, naming the field and the fix."""
    pipe, dp = plan.pipeline, plan.mesh.dp
    local_batch_size = spec.global_batch_size // dp
    if spec.global_batch_size % dp or local_batch_size % pipe.num_microbatches:
        raise PlanError(f"pipeline.num_microbatches={pipe.num_microbatches} does not divide the batch of each "
                        f"dp rank ({spec.global_batch_size} / dp={dp} = {spec.global_batch_size / dp:g}); "
                        "pick a num_microbatches that divides it (every micro-batch must have the same size, "
                        "the traced stages bake it in)")


def trace_pipeline(plan: Plan, spec: ModelSpec, device: torch.device | None = None):
    """Export `spec.model` on a micro-batch from `spec.make_batch` (moved to `device`, where the model lives)
    and split it at the plan's stage boundaries.

    Returns the `Pipe`. Raises PlanError when the forward cannot be exported or a boundary cannot be cut.
    """
    check_micro_batching(plan, spec)
    example_inputs, _ = spec.make_batch(plan.micro_batch_size, 0)
    if device is not None:
        example_inputs = [t.to(device) if isinstance(t, torch.Tensor) else t for t in example_inputs]
    split_spec = split_spec_for(plan)
    try:
        pipe = pipeline(spec.model, tuple(example_inputs), split_spec=split_spec)
    except Exception as err:
        raise PlanError(f"pipeline: torch.export could not trace the model for splitting at {list(split_spec)} "
                        f"({type(err).__name__}: {err}); pipeline plans need a forward torch.export can capture "
                        "(see the cause above), or set mesh.pp to 1") from err
    try:
        if pipe.num_stages != plan.num_stages:
            raise AttributeError(f"{pipe.num_stages} stages")
        for stage in range(plan.num_stages):
            pipe.get_stage_module(stage)
    except AttributeError as err:  # an empty stage has no module
        raise PlanError(f"pipeline: cutting before {list(split_spec)} did not give the plan's {plan.num_stages} "
                        f"non-empty stages (got {[name for name, _ in pipe.split_gm.named_children()]}): a layer "
                        "that runs more than once, or first of all, cannot start a stage; move the layers' "
                        "'stage' boundary to a layer that runs once, after the first") from err
    check_stage_parameters(plan, pipe)
    relay_skipping_values(pipe)
    check_neighbour_inputs(pipe)
    order_inputs_as_sent(pipe)
    make_boundaries_contiguous(pipe)
    return pipe


def check_neighbour_inputs(pipe) -> None:
    """Every stage after the first must take its inputs from the stage just before it.

    torch.distributed.pipelining sends activations only between neighbouring stages. Values made on one stage and
    used further on are relayed before this check (runtime/stage_relay.py); what is left are model inputs used
    past stage 0, a skip connection its schedules would refuse mid-run.
    """
    stage_calls = [node for node in pipe.split_gm.graph.nodes if node.op == "call_module"]
    stage_of = {node: stage for stage, node in enumerate(stage_calls)}
    for stage, call in enumerate(stage_calls):
        for value in call.all_input_nodes:
            source = value
            while source.op == "call_function" and source.target is operator.getitem:
                source = source.args[0]
            made_on = stage_of.get(source)
            if stage > 0 and made_on != stage - 1:
                origin = "is a model input" if made_on is None else f"is computed on stage {made_on}"
                raise PlanError(f"pipeline: stage {stage} uses {_describe(pipe, value)}, which {origin}, not on stage "
                                f"{stage - 1}; torch.distributed.pipelining passes values only between neighbouring "
                                "stages. Compute the value inside the layers that use it, or keep its producer and "
                                "all its users on one stage (fewer stages, or mesh.pp = 1)")


def check_stage_parameters(plan: Plan, pipe) -> None:
    """Every parameter must land in exactly one stage, the one the plan puts its layer on."""
    owner: dict[str, int] = {}
    for stage in range(pipe.num_stages):
        for name, _ in pipe.get_stage_module(stage).named_parameters():
            if name in owner:
                raise PlanError(f"pipeline: parameter {name} is used on stages {owner[name]} and {stage} (a tied "
                                "weight, or a layer that runs on both); put the layers that use it on the same "
                                "stage")
            owner[name] = stage
    stage_of_layer = {layer.path: layer.stage for layer in plan.layers}
    for name, stage in owner.items():
        layer = max((p for p in stage_of_layer if name.startswith(p + ".") or not p), key=len, default=None)
        if layer is not None and stage_of_layer[layer] != stage:
            raise PlanError(f"pipeline: parameter {name} of layer {layer} is used on stage {stage}, but the plan "
                            f"puts {layer} on stage {stage_of_layer[layer]}; move the stage boundary so the layer "
                            "sits with the code that uses its parameters")


def _describe(pipe, value) -> str:
    """A value passed between stages, by the name and source line it has inside the stage that makes it."""
    value = produced_value(pipe, value)
    where = value.meta.get("stack_trace", "").strip().splitlines()
    return f"{value.name!r}" + (f" ({where[0].strip()}: {where[-1].strip()})" if len(where) >= 2 else "")


def _release_other_stages(pipe, keep: list[int]) -> None:
    """Drop the modules (and with them the parameters) of stages this rank does not run.

    The stages built from `pipe` keep its split graph, and with it every stage module, alive; emptying the
    others' slots there is what frees them.
    """
    drop = {id(pipe.get_stage_module(stage)) for stage in range(pipe.num_stages) if stage not in keep}
    for name, module in list(pipe.split_gm.named_children()):
        if id(module) in drop:
            pipe.split_gm.register_module(name, nn.Module())
    gc.collect()


def build_pipeline(plan: Plan, spec: ModelSpec, mesh: DeviceMesh, device: torch.device) -> PipelineParts:
    """Split, shard and wrap this rank's stages, and build the plan's schedule over them.

    `spec.model` is consumed: its parameters move into the stage modules and the other stages are dropped.
    """
    # what the traced stages no longer show by module type: norms of sequence-parallel layers, vocab roles
    sequence_local = sequence_local_modules(spec.model, plan)
    vocab_roles = check_vocab_layers(spec.model, plan, mesh["tp"].size())
    pipe = trace_pipeline(plan, spec, device)
    spec.model = nn.Module()  # the stage modules own the parameters from now on
    stage_ids = stage_ids_on_rank(plan, mesh["pp"].get_local_rank())
    _release_other_stages(pipe, stage_ids)
    stages, modules, stage_parameters = [], [], []
    ddp = plan.data_parallel.kind in DDP_KINDS
    for stage_id in stage_ids:
        module = pipe.get_stage_module(stage_id)
        stage_plan = dataclasses.replace(plan, layers=[layer for layer in plan.layers if layer.stage == stage_id])
        apply_tensor_parallel(module, stage_plan, mesh["tp"])
        apply_tensor_parallel_2d(module, stage_plan, mesh["tp"])
        apply_vocab_parallel(module, stage_plan, mesh["tp"], vocab_roles)
        apply_sequence_parallel(module, stage_plan, mesh["tp"], sequence_local)
        apply_activation_checkpointing(module, stage_plan)
        apply_activation_offload(module, stage_plan, device)
        if ddp and plan.precision.param_dtype != "float32":
            module.register_forward_hook(_outputs_to_float32)
        # zero2 / zero3 (HSDP too) shard `module` in place; ddp / zero1 return a DDP wrapper over it
        wrapped = apply_data_parallel(module, stage_plan, mesh, device, ddp_class=_StageDDP)
        stage = pipe.build_stage(stage_id, device, group=mesh["pp"].get_group())
        if ddp:
            stage.submod = wrapped  # the schedule runs DDP stages under no_sync() but the last backward
            stage_parameters.append(wrapped.meshplan_parameters)
        else:
            stage_parameters.append(list(module.named_parameters()))
        stages.append(stage)
        modules.append(module)
    schedule = build_schedule(plan, spec, stages)
    return PipelineParts(stage_ids=stage_ids, modules=modules, schedule=schedule,
                         has_first=stage_ids[0] == 0, has_last=stage_ids[-1] == plan.num_stages - 1,
                         stage_parameters=stage_parameters,
                         grad_divisor=plan.pipeline.num_microbatches if ddp else 1)


def _outputs_to_float32(module: nn.Module, args, output):
    """ddp / zero1 compute in param_dtype under `torch.autocast`; a stage's outputs travel to the next stage into
    receive buffers traced in float32 (FSDP2 kinds get the same from `MixedPrecisionPolicy.output_dtype`)."""
    return tree_map_only(torch.Tensor, lambda t: t.float() if t.is_floating_point() else t, output)


def build_schedule(plan: Plan, spec: ModelSpec, stages: list[_PipelineStageBase]) -> _PipelineSchedule:
    """The plan's schedule; loss_fn runs per micro-batch on the last stage.

    `spec.loss_fn` is a mean over its micro-batch and the summed gradients are divided by num_microbatches
    (by the schedule, `scale_grads=True`, for FSDP2 kinds; by `pipeline_train_step` for DDP kinds, see the
    module docstring), so gradients are the mean over this dp rank's batch, and FSDP's or DDP's average over dp
    makes them the global-batch mean, as in one process.
    """
    schedule_class = SCHEDULE_CLASSES[plan.pipeline.schedule]
    n = plan.pipeline.num_microbatches
    scale = plan.data_parallel.kind not in DDP_KINDS
    if schedule_class is ScheduleInterleaved1F1B:
        return schedule_class(stages, n_microbatches=n, loss_fn=spec.loss_fn, scale_grads=scale)
    return schedule_class(stages[0], n_microbatches=n, loss_fn=spec.loss_fn, scale_grads=scale)


def pipeline_train_step(parts: PipelineParts, plan: Plan, inputs, targets, mesh: DeviceMesh) -> torch.Tensor:
    """Run the schedule over this dp rank's batch (forward + backward of every micro-batch).

    Returns the mean loss over this dp rank's batch on every rank of its pipeline (summed from the last stage
    over the pp group: the other stages contribute zero). The caller steps the optimizer.
    """
    losses: list[torch.Tensor] = []
    args = tuple(inputs) if parts.has_first else ()
    # the last stage's loss and its backward run inside step: under loss_parallel for a `vocab` head
    with loss_context(plan), forward_context(plan), autocast_context(plan, targets.device):
        parts.schedule.step(*args, target=targets if parts.has_last else None, losses=losses,
                            return_outputs=False)
    if parts.grad_divisor != 1:
        for p in parts.parameters():
            if p.grad is not None:
                p.grad.div_(parts.grad_divisor)
    if parts.has_last:
        loss = torch.stack([loss_value(loss) for loss in losses]).mean().to(torch.float64)
    else:
        loss = torch.zeros((), dtype=torch.float64, device=targets.device)
    if plan.mesh.pp > 1:
        dist.all_reduce(loss, group=mesh["pp"].get_group())
    return loss
