"""`meshplan validate plan.yaml MODEL --cluster C`: check a (hand-edited) plan and price it again.

Loading checks the plan on its own (schema, world size = pp x dp x tp, contiguous stages, ...) and the
runtime's pre-flight check refuses what the runtime cannot run. Then planner/recost.py checks it against the
model (fingerprint, layer paths, tensor-parallel units are the model's real linears, every choice one the
planner offers) and prices its choices with the search's own cost path (ConfigPricer.predict). The report
puts the re-costed step time and peak memory beside the plan's recorded prediction. A plan that does not fit
the cluster's memory is an error (exit 2) naming what to change.
"""

from __future__ import annotations

from costmodel import load_cluster
from meshplan.diff import delta_columns
from meshplan.show import format_table, memory_parts_mib, time_parts_ms
from planner.model_graph import build_model_graph
from planner.model_spec import load_model_spec
from planner.plan import Plan, Prediction
from planner.plan_schema import PlanError
from planner.recost import Recosted, recost_plan


def recost_file(plan: Plan, model: str, cluster_name: str) -> Recosted:
    """Load the model on the meta device, trace it, and price the plan's choices on `cluster_name`."""
    cluster = load_cluster(cluster_name).for_world_size(plan.world_size)
    spec = load_model_spec(model, device="meta")
    if spec.global_batch_size != plan.model.global_batch_size:
        raise PlanError(f"field 'model.global_batch_size' is {plan.model.global_batch_size} but {model} trains "
                        f"with a global batch of {spec.global_batch_size}; set it to {spec.global_batch_size} "
                        "(and micro-batching to divide it) or re-run `meshplan plan`")
    return recost_plan(plan, spec.model, build_model_graph(spec), cluster)


def format_comparison(recorded: Prediction, recosted: Prediction) -> list[str]:
    """Recorded against re-costed step time and memory, with each part."""
    rows = [["step time (ms)", f"{recorded.step_time_ms:.3f}", f"{recosted.step_time_ms:.3f}",
             *delta_columns(recorded.step_time_ms, recosted.step_time_ms)]]
    now = dict(time_parts_ms(recosted))
    rows += [[f"  {n}", f"{v:.3f}", f"{now[n]:.3f}", *delta_columns(v, now[n])] for n, v in time_parts_ms(recorded)
             if n in now]
    rows.append(["peak memory (MiB)", f"{recorded.peak_memory_mib:.3f}", f"{recosted.peak_memory_mib:.3f}",
                 *delta_columns(recorded.peak_memory_mib, recosted.peak_memory_mib)])
    now = dict(memory_parts_mib(recosted))
    rows += [[f"  {n}", f"{v:.3f}", f"{now[n]:.3f}", *delta_columns(v, now[n])] for n, v in memory_parts_mib(recorded)
             if n in now]
    rows.append(["memory limit (MiB)", f"{recorded.memory_limit_mib:.1f}", f"{recosted.memory_limit_mib:.1f}",
                 *delta_columns(recorded.memory_limit_mib, recosted.memory_limit_mib)])
    return format_table(["", "recorded", "re-costed", "delta", "delta %"], rows, right={1, 2, 3, 4})


def changed_layers(plan: Plan, recosted: Recosted) -> list[list[str]]:
    """Layers whose recorded time or memory differs from the re-costed one (the edited ones, usually)."""
    return [[layer.path or "<root>", f"{layer.predicted_time_ms:.3f}", f"{time_ms:.3f}",
             f"{layer.predicted_memory_mib:.3f}", f"{memory_mib:.3f}"]
            for layer, (time_ms, memory_mib) in zip(plan.layers, recosted.layers, strict=True)
            if (layer.predicted_time_ms, layer.predicted_memory_mib) != (time_ms, memory_mib)]


def overflow_fix(plan: Plan, recosted: Recosted) -> str:
    """What to change when the plan does not fit, ordered by what usually helps most."""
    fixes = []
    heavy = [layer.path for layer in plan.layers if layer.checkpoint != "full" and layer.path.count(".")]
    if heavy:
        fixes.append(f"set checkpoint 'full' on more layers (e.g. layers {', '.join(heavy[:3])})")
    if plan.data_parallel.kind != "zero3" and plan.mesh.dp > 1:
        fixes.append("set data_parallel.kind to 'zero3'")
    fixes.append("raise pipeline.num_microbatches (smaller micro-batches)" if plan.mesh.pp == 1 else
                 "raise mesh.pp or move layers to later stages")
    fixes.append("or re-run `meshplan plan`, which only writes plans that fit")
    return "; ".join(fixes)


def validate_plan(plan_path: str, model: str, cluster_name: str) -> tuple[str, Plan, Recosted]:
    """The report text, the plan and its re-costing; PlanError when the plan is inconsistent with the model.
    Whether it fits is for `check_fits`, after the report is printed."""
    from runtime.train import check_runtime_supports

    plan = Plan.load(plan_path)
    recosted = recost_file(plan, model, cluster_name)
    check_runtime_supports(plan)  # what the runtime refuses before starting any rank
    lines = [f"{plan_path}: consistent with {model} (fingerprint {plan.model.fingerprint}, "
             f"{len(plan.layers)} layers, mesh pp={plan.mesh.pp} x dp={plan.mesh.dp} x tp={plan.mesh.tp} = "
             f"{plan.world_size} ranks)", ""]
    if plan.cluster.get("name") != recosted.cluster_name:
        lines += [f"note: planned on cluster {plan.cluster.get('name')!r}, re-costed on {recosted.cluster_name!r}", ""]
    lines += format_comparison(plan.predicted, recosted.prediction)
    changed = changed_layers(plan, recosted)
    if changed:
        lines += ["", "layers whose prediction changed"] + format_table(
            ["layer", "time ms (recorded)", "time ms (re-costed)", "MiB (recorded)", "MiB (re-costed)"], changed,
            right={1, 2, 3, 4})
    lines += [f"note: {n}" for n in recosted.notes]
    return "\n".join(lines), plan, recosted


def check_fits(plan_path: str, plan: Plan, recosted: Recosted) -> None:
    """Raise PlanError when the re-costed peak memory exceeds the cluster's usable memory."""
    if recosted.fits:
        return
    p = recosted.prediction
    raise PlanError(f"{plan_path}: predicted peak memory {p.peak_memory_mib:,.3f} MiB per device exceeds the "
                    f"{p.memory_limit_mib:,.1f} MiB the cluster allows (fields 'layers[*].checkpoint', "
                    f"'data_parallel.kind', 'pipeline.num_microbatches'). To fit: {overflow_fix(plan, recosted)}")
