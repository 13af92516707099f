"""`meshplan export plan.yaml --to torchtitan|megatron|deepspeed`: a plan's decision as another trainer's config.

Each target speaks a coarser language than a plan: one activation-checkpoint mode for every block, tensor
parallelism on every block or none, one data-parallel flavour, evenly cut pipelines, no activation offload. So an
export first finds the nearest plan the target can say (`nearest_plan`: each change it makes is listed with why)
and refuses, naming the reason, what the target cannot say at all (a pipeline in DeepSpeed's JSON, blocks
replicated over a tp > 1 axis). When something changed, `meshplan export` re-costs the nearest plan with the
planner's own pricer (the `validate` path) and prints its prediction beside the original's.

What is written:
- torchtitan (0.3): command-line overrides of its Trainer config, one per line (`--parallelism.*`,
  `--training.*` and the `activation_checkpoint:MODE` subcommand), for `torchtitan.train --module M --config C
  $(cat FILE)`; what is not given keeps the chosen config's value.
- megatron: Megatron-LM's command-line arguments, one per line (`pretrain_gpt.py $(cat FILE)`).
- deepspeed: the DeepSpeed config JSON (`deepspeed.initialize(config=FILE)`).
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from planner.plan import Plan
from planner.plan_schema import PlanError

TARGETS = ("torchtitan", "megatron", "deepspeed")
_CHECKPOINT_ORDER = ("none", "selective", "full")
_TITAN_SCHEDULE = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved_1f1b": "Interleaved1F1B"}


class ExportError(PlanError):
    """The target cannot express this plan, not even approximately; the message says why and what to change."""


@dataclass
class Export:
    """An exported config and how it differs from the plan."""

    target: str
    text: str
    """The config file's contents."""
    nearest: Plan
    """The plan the config says: the original, or a copy with the changes below."""
    changes: list[str] = field(default_factory=list)
    """What had to change for the target to express the plan (empty: exact)."""
    notes: list[str] = field(default_factory=list)
    """What the config leaves to the user's code (which modules to wrap, how the model is built)."""


def block_indices(plan: Plan) -> list[int]:
    """The layers of the chain's repeated kind (the transformer blocks); embeddings, final norm and head differ."""
    kinds = Counter(layer.kind for layer in plan.layers)
    kind, count = kinds.most_common(1)[0]
    return [i for i, layer in enumerate(plan.layers) if layer.kind == kind] if count > 1 else []


def _sequence_length(plan: Plan) -> int | None:
    """The seq-len of an `hf:` source, when the plan records one."""
    _, _, query = plan.model.source.partition("?")
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if key == "seq-len" and value.isdigit():
            return int(value)
    return None


def _refuse_replicated_blocks(plan: Plan, target: str) -> None:
    if plan.mesh.tp == 1:
        return
    replicated = [plan.layers[i].path for i in block_indices(plan) if plan.layers[i].strategy == "replicate"]
    if replicated:
        raise ExportError(f"{target} shards every transformer block over tensor parallelism, but this plan "
                          f"replicates {len(replicated)} block(s) on its tp={plan.mesh.tp} axis ({replicated[0]}, "
                          "...); re-plan with --mesh pinning tp=1, or edit those layers to strategy tensor")


def _uniform_checkpoint(plan: Plan, changes: list[str], target: str) -> str:
    """Every block gets the most memory-saving mode any block had (so the nearest plan still fits); other layers
    none. Returns the mode."""
    blocks = block_indices(plan)
    modes = {plan.layers[i].checkpoint for i in blocks}
    mode = max(modes, key=_CHECKPOINT_ORDER.index) if modes else "none"
    if len(modes) > 1:
        changes.append(f"activation checkpointing: {target} applies one mode to every block; this plan mixes "
                       f"{sorted(modes)}, so every block now uses {mode!r} (the one that saves the most memory)")
    for i in blocks:
        plan.layers[i].checkpoint = mode
    others = [layer for i, layer in enumerate(plan.layers) if i not in set(blocks) and layer.checkpoint != "none"]
    if others:
        changes.append(f"activation checkpointing of {[layer.path for layer in others]} dropped: {target} "
                       "checkpoints transformer blocks only")
        for layer in others:
            layer.checkpoint = "none"
    return mode


def _common_changes(plan: Plan, target: str, changes: list[str]) -> None:
    """What none of the targets says: activation offload, 2-D tensor parallelism."""
    offloaded = [layer for layer in plan.layers if layer.offload_activations]
    if offloaded:
        changes.append(f"activation offload of {len(offloaded)} layer(s) dropped: {target}'s config has no "
                       "per-layer save_on_cpu")
        for layer in offloaded:
            layer.offload_activations = False
    grid = [layer for layer in plan.layers if layer.strategy == "tensor2d"]
    if grid:
        changes.append(f"{len(grid)} tensor2d layer(s) made 1-D tensor parallel (same units): {target} has no "
                       "2-D tensor parallelism")
        for layer in grid:
            layer.strategy, layer.tp_rows = "tensor", 0


def _stage_block_counts(plan: Plan) -> list[int]:
    counts = Counter(plan.layers[i].stage for i in block_indices(plan))
    return [counts.get(s, 0) for s in range(plan.mesh.pp * plan.pipeline.virtual_stages)]


def nearest_plan(plan: Plan, target: str) -> tuple[Plan, list[str]]:
    """A copy of `plan` that `target` can express, and the changes made; ExportError when none is near."""
    if target not in TARGETS:
        raise ExportError(f"unknown export target {target!r}; choose one of {list(TARGETS)}")
    near, changes = copy.deepcopy(plan), []
    _common_changes(near, target, changes)
    dpp, mesh = near.data_parallel, near.mesh
    if target == "deepspeed":
        if mesh.pp > 1:
            raise ExportError(f"DeepSpeed's JSON config cannot say a pipeline (pp={mesh.pp}): its stages are built "
                              "in code with deepspeed.pipe.PipelineModule(num_stages=...), and its pipeline engine "
                              "runs ZeRO stage 1 at most; re-plan with --mesh 1xDPxTP, or export to megatron or "
                              "torchtitan")
        if mesh.tp > 1 and dpp.kind == "zero3":
            raise ExportError("DeepSpeed's AutoTP training (tensor_parallel.autotp_size) runs with ZeRO stages 0-2, "
                              f"not ZeRO-3; this plan is tp={mesh.tp} with zero3: re-plan with --mesh pinning tp=1")
        if dpp.replicate > 1:
            changes.append(f"HSDP ({dpp.replicate} replicas) made plain sharding over all of dp: DeepSpeed's "
                           "ZeRO partitions over the whole data-parallel group")
            dpp.replicate = 1
    if target in ("torchtitan", "megatron"):
        _refuse_replicated_blocks(near, target)
        if mesh.pp > 1:
            _even_cut(near, target)
        _uniform_checkpoint(near, changes, target)
        tensor_layers = [layer for layer in near.layers if layer.strategy == "tensor"]
        if tensor_layers and not all(layer.sequence_parallel for layer in tensor_layers):
            if target == "torchtitan" or any(layer.sequence_parallel for layer in tensor_layers):
                changes.append(f"sequence parallelism turned on for every tensor-parallel layer: {target} "
                               + ("always runs it with tensor parallelism" if target == "torchtitan" else
                                  "has one --sequence-parallel switch for all layers"))
                for layer in tensor_layers:
                    layer.sequence_parallel = True
    if target == "torchtitan" and near.precision.param_dtype == "float16":
        changes.append("float16 made bfloat16: torchtitan's mixed_precision_param is bfloat16 or float32")
        near.precision.param_dtype = "bfloat16"
    if target == "torchtitan" and near.precision.reduce_dtype != "float32":
        changes.append("gradient reduction made float32: torchtitan's mixed_precision_reduce is float32 only")
        near.precision.reduce_dtype = "float32"
    if target == "torchtitan" and dpp.kind == "zero1":
        changes.append("zero1 made zero2: torchtitan shards with FSDP2 (ZeRO-2 is fsdp_reshard_after_forward "
                       "'never'), it has no optimizer-only sharding")
        dpp.kind = "zero2"
    if target == "megatron":
        if near.pipeline.schedule == "gpipe":
            changes.append("GPipe made 1F1B: Megatron-LM runs 1F1B (or interleaved) schedules only")
            near.pipeline.schedule = "1f1b"
        if dpp.kind == "zero3" and (dpp.replicate > 1 or dpp.offload):
            changes.append("zero3 with HSDP or host offload made plain zero3: Megatron-LM's --use-torch-fsdp2 "
                           "shards over the whole data-parallel group, on the device")
            dpp.replicate, dpp.offload = 1, False
        if dpp.kind != "zero3" and dpp.replicate > 1:
            dpp.replicate = 1
    return near, changes


def _even_cut(plan: Plan, target: str) -> tuple[int, int, int]:
    """(blocks per middle stage, how many fewer on the first, on the last): both targets cut the blocks evenly
    and let only the end stages hold fewer; ExportError for another cut."""
    counts = _stage_block_counts(plan)
    middle = counts[1:-1] or [max(counts)]
    if len(set(middle)) > 1 or counts[0] > middle[0] or counts[-1] > middle[0]:
        raise ExportError(f"{target} cuts the blocks evenly and only the first and last stage may hold fewer; this "
                          f"plan's stages hold {counts} blocks: edit the stages of plan.yaml to such a cut")
    return middle[0], middle[0] - counts[0], middle[0] - counts[-1]


def _flag(name: str, on: bool) -> str:
    section, _, key = name.rpartition(".")
    return f"--{name}" if on else f"--{section}.no-{key.replace('_', '-')}"


def torchtitan_arguments(plan: Plan) -> list[str]:
    """torchtitan (0.3) command-line overrides of its Trainer config: `--section.field value`
    (torchtitan.config.configs ParallelismConfig / TrainingConfig field names), plus the activation
    checkpointing subcommand (`activation_checkpoint:full|selective|none`)."""
    mesh, dpp, pipe = plan.mesh, plan.data_parallel, plan.pipeline
    ddp = dpp.kind == "ddp"
    args = [f"--parallelism.data_parallel_replicate_degree {mesh.dp if ddp else dpp.replicate}",
            f"--parallelism.data_parallel_shard_degree {1 if ddp else mesh.dp // dpp.replicate}",
            f"--parallelism.tensor_parallel_degree {mesh.tp}",
            _flag("parallelism.enable_sequence_parallel", any(layer.sequence_parallel for layer in plan.layers)),
            f"--parallelism.pipeline_parallel_degree {mesh.pp}"]
    if not ddp:
        reshard = "always" if dpp.kind == "zero3" and dpp.reshard_after_forward else "never"
        args.append(f"--parallelism.fsdp_reshard_after_forward {reshard}")
    if mesh.pp > 1:
        per_stage, first_less, last_less = _even_cut(plan, "torchtitan")
        args += [f"--parallelism.pipeline_parallel_schedule {_TITAN_SCHEDULE[pipe.schedule]}",
                 f"--parallelism.pipeline_parallel_microbatch_size {plan.micro_batch_size}",
                 f"--parallelism.pipeline_parallel_layers_per_stage {per_stage}",
                 f"--parallelism.pipeline_parallel_first_stage_less_layers {first_less}",
                 f"--parallelism.pipeline_parallel_last_stage_less_layers {last_less}"]
    local = plan.model.global_batch_size // mesh.dp
    args += [f"--training.local_batch_size {local // pipe.num_microbatches if mesh.pp == 1 else local}",
             f"--training.global_batch_size {plan.model.global_batch_size}",
             f"--training.mixed_precision_param {plan.precision.param_dtype}",
             f"--training.mixed_precision_reduce {plan.precision.reduce_dtype}",
             _flag("training.enable_cpu_offload", dpp.offload)]
    seq_len = _sequence_length(plan)
    if seq_len is not None:
        args.append(f"--training.seq_len {seq_len}")
    blocks = block_indices(plan)
    args.append(f"activation_checkpoint:{plan.layers[blocks[0]].checkpoint if blocks else 'none'}")
    return args


def megatron_arguments(plan: Plan) -> list[str]:
    """Megatron-LM's command-line arguments (megatron/training/arguments.py names)."""
    mesh, dpp, pipe = plan.mesh, plan.data_parallel, plan.pipeline
    args = [f"--tensor-model-parallel-size {mesh.tp}", f"--pipeline-model-parallel-size {mesh.pp}",
            f"--micro-batch-size {plan.micro_batch_size}", f"--global-batch-size {plan.model.global_batch_size}"]
    blocks = block_indices(plan)
    counts = _stage_block_counts(plan)
    if pipe.schedule == "interleaved_1f1b":
        args.append(f"--num-layers-per-virtual-pipeline-stage {counts[1] if len(counts) > 2 else counts[0]}")
    if mesh.pp > 1 and len(counts) > 2:
        if counts[0] != counts[1]:
            args.append(f"--decoder-first-pipeline-num-layers {counts[0]}")
        if counts[-1] != counts[1]:
            args.append(f"--decoder-last-pipeline-num-layers {counts[-1]}")
    if blocks:
        args.append(f"--num-layers {len(blocks)}")
    if any(layer.sequence_parallel for layer in plan.layers):
        args.append("--sequence-parallel")
    mode = plan.layers[blocks[0]].checkpoint if blocks else "none"
    if mode == "full":
        args += ["--recompute-granularity full", "--recompute-method uniform", "--recompute-num-layers 1"]
    elif mode == "selective":
        args.append("--recompute-granularity selective")
    if dpp.kind in ("zero1", "zero2"):
        args.append("--use-distributed-optimizer")
    elif dpp.kind == "zero3":
        args += ["--use-torch-fsdp2", "--ckpt-format torch_dist"]
    if plan.precision.param_dtype == "bfloat16":
        args.append("--bf16")
    elif plan.precision.param_dtype == "float16":
        args.append("--fp16")
    if plan.precision.reduce_dtype == "float32" and plan.precision.param_dtype != "float32":
        args.append("--accumulate-allreduce-grads-in-fp32")
    seq_len = _sequence_length(plan)
    if seq_len is not None:
        args.append(f"--seq-length {seq_len}")
    return args


def deepspeed_config(plan: Plan) -> dict:
    """The DeepSpeed config (deepspeed.runtime.config.DeepSpeedConfig keys)."""
    mesh, dpp, pipe = plan.mesh, plan.data_parallel, plan.pipeline
    stage = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}[dpp.kind]
    zero = {"stage": stage}
    if dpp.offload:
        zero["offload_param"] = {"device": "cpu"}
        zero["offload_optimizer"] = {"device": "cpu"}
    config = {"train_batch_size": plan.model.global_batch_size,
              "train_micro_batch_size_per_gpu": plan.micro_batch_size,
              "gradient_accumulation_steps": pipe.num_microbatches,
              "zero_optimization": zero,
              "bf16": {"enabled": plan.precision.param_dtype == "bfloat16"},
              "fp16": {"enabled": plan.precision.param_dtype == "float16"}}
    if mesh.tp > 1:
        config["tensor_parallel"] = {"autotp_size": mesh.tp}
    return config


def _notes(plan: Plan, target: str) -> list[str]:
    checkpointed = [layer.path for layer in plan.layers if layer.checkpoint != "none"]
    notes = [f"the model itself is built by your {target} code; this config carries the parallel layout, "
             "micro-batching, checkpointing and precision"]
    if target == "deepspeed" and checkpointed:
        notes.append(f"DeepSpeed checkpoints what your code wraps: wrap {checkpointed[0]}, ... ({len(checkpointed)} "
                     "layers) with deepspeed.checkpointing.checkpoint")
    return notes


def export_plan(plan: Plan, target: str) -> Export:
    """The plan as `target`'s config (the nearest expressible plan's, with the changes listed)."""
    near, changes = nearest_plan(plan, target)
    if target == "torchtitan":
        text = "\n".join(torchtitan_arguments(near)) + "\n"
    elif target == "megatron":
        text = "\n".join(megatron_arguments(near)) + "\n"
    else:
        text = json.dumps(deepspeed_config(near), indent=2) + "\n"
    return Export(target, text, near, changes, _notes(near, target))


def recost_nearest(export: Export, plan_dir: Path | None):
    """The nearest plan priced with the planner's own cost path on the plan's own cluster (as `validate` does)."""
    from costmodel import Cluster
    from planner.model_graph import build_model_graph
    from planner.model_spec import load_model_spec
    from planner.recost import recost_plan

    near = export.nearest
    cluster = Cluster.from_dict(near.cluster, source="plan: cluster").for_world_size(near.world_size)
    spec = load_model_spec(near.model.source, base_dir=plan_dir, device="meta")
    return recost_plan(near, spec.model, build_model_graph(spec), cluster)


def add_arguments(parser) -> None:
    parser.add_argument("plan")
    parser.add_argument("--to", required=True, choices=TARGETS, help="the trainer whose config to write")
    parser.add_argument("--out", help="write the config here (default: print it)")


def run_export(args) -> int:
    """`meshplan export`: write the config; when the plan had to change, list the changes and print the nearest
    plan's re-costed prediction beside the original's."""
    import sys

    from meshplan.validate import format_comparison

    plan = Plan.load(args.plan)
    export = export_plan(plan, args.to)
    report = sys.stdout if args.out else sys.stderr
    if args.out:
        Path(args.out).write_text(export.text)
        print(f"wrote {args.out} ({args.to})", file=report)
    else:
        print(export.text, end="")
    if export.changes:
        print(f"\n{args.to} cannot say this plan exactly; the config says the nearest plan:", file=report)
        for change in export.changes:
            print(f"  - {change}", file=report)
        recosted = recost_nearest(export, Path(args.plan).resolve().parent)
        print("\noriginal plan (recorded prediction) against the exported one (re-costed):", file=report)
        print("\n".join(format_comparison(plan.predicted, recosted.prediction)), file=report)
        if recosted.prediction.peak_memory_mib > recosted.prediction.memory_limit_mib:
            print("warning: the exported plan does not fit the device memory", file=report)
    else:
        print(f"{args.to} says this plan exactly", file=report)
    for note in export.notes:
        print(f"note: {note}", file=report)
    return 0
