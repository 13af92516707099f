"""`meshplan diff a.yaml b.yaml`: what changed between two plans and what the planner predicts it does.

Compares the mesh, data-parallel flavour, precision, pipeline (schedule, micro-batches, virtual stages) and every
layer's choices (stage, strategy, tensor-parallel units, sequence parallel, checkpointing, offload), then the
predicted step time and peak memory with each of their parts, as absolute and relative deltas.
"""

from __future__ import annotations

from meshplan.show import format_table, memory_parts_mib, time_parts_ms
from planner.plan import LayerPlan, Plan

PLAN_FIELDS = ("world_size", "mesh.pp", "mesh.dp", "mesh.tp", "data_parallel.kind", "data_parallel.replicate",
               "data_parallel.reshard_after_forward", "data_parallel.offload", "precision.param_dtype",
               "precision.reduce_dtype", "pipeline.schedule", "pipeline.num_microbatches",
               "pipeline.virtual_stages", "model.global_batch_size", "model.fingerprint", "seed")
LAYER_FIELDS = ("stage", "strategy", "sequence_parallel", "checkpoint", "offload_activations")


def _get(plan: Plan, dotted: str):
    value = plan
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _units(layer: LayerPlan) -> str:
    return "; ".join(f"{','.join(u.colwise)}->{u.rowwise}" for u in layer.tensor_parallel) or "-"


def changed_fields(a: Plan, b: Plan) -> list[tuple[str, str, str]]:
    """(field, value in a, value in b) of every plan-level and per-layer field that differs."""
    changes = [(f, str(_get(a, f)), str(_get(b, f))) for f in PLAN_FIELDS if _get(a, f) != _get(b, f)]
    if a.cluster.get("name") != b.cluster.get("name"):
        changes.append(("cluster.name", str(a.cluster.get("name")), str(b.cluster.get("name"))))
    elif a.cluster != b.cluster:
        changes.append(("cluster", "(profile)", "(profile with other numbers)"))
    layers_a = {layer.path: layer for layer in a.layers}
    layers_b = {layer.path: layer for layer in b.layers}
    for path in dict.fromkeys([*layers_a, *layers_b]):
        name = f"layer {path or '<root>'}"
        if path not in layers_b:
            changes.append((name, "present", "absent"))
            continue
        if path not in layers_a:
            changes.append((name, "absent", "present"))
            continue
        la, lb = layers_a[path], layers_b[path]
        changes += [(f"{name}.{f}", str(getattr(la, f)), str(getattr(lb, f))) for f in LAYER_FIELDS
                    if getattr(la, f) != getattr(lb, f)]
        if _units(la) != _units(lb):
            changes.append((f"{name}.tensor_parallel", _units(la), _units(lb)))
    return changes


def delta_columns(before: float, after: float) -> tuple[str, str]:
    change = after - before
    relative = f"{change / before:+.1%}" if before else ("0.0%" if not change else "new")
    return f"{change:+.3f}", relative


def format_diff(a: Plan, b: Plan, name_a: str = "a", name_b: str = "b", recosted: bool = False) -> str:
    """Changed fields, then predicted step time and memory of both plans with deltas (`recosted`: the
    predictions were just priced again rather than read from the files)."""
    changes = changed_fields(a, b)
    lines = [f"--- {name_a}", f"+++ {name_b}", ""]
    if changes:
        lines += format_table(["field", name_a, name_b], [list(c) for c in changes])
    else:
        lines.append("no changes to the mesh, parallelism or layer choices")
    if a.model.fingerprint != b.model.fingerprint:
        lines += ["", "note: the plans are for different models (fingerprints differ)"]
    pa, pb = a.predicted, b.predicted
    rows = [["step time (ms)", f"{pa.step_time_ms:.3f}", f"{pb.step_time_ms:.3f}",
             *delta_columns(pa.step_time_ms, pb.step_time_ms)]]
    parts_b = dict(time_parts_ms(pb))
    rows += [[f"  {name}", f"{ms:.3f}", f"{parts_b[name]:.3f}", *delta_columns(ms, parts_b[name])]
             for name, ms in time_parts_ms(pa) if name in parts_b and (ms or parts_b[name])]
    rows.append(["peak memory (MiB)", f"{pa.peak_memory_mib:.3f}", f"{pb.peak_memory_mib:.3f}",
                 *delta_columns(pa.peak_memory_mib, pb.peak_memory_mib)])
    parts_b = dict(memory_parts_mib(pb))
    rows += [[f"  {name}", f"{mib:.3f}", f"{parts_b[name]:.3f}", *delta_columns(mib, parts_b[name])]
             for name, mib in memory_parts_mib(pa) if name in parts_b and (mib or parts_b[name])]
    rows.append(["memory limit (MiB)", f"{pa.memory_limit_mib:.1f}", f"{pb.memory_limit_mib:.1f}",
                 *delta_columns(pa.memory_limit_mib, pb.memory_limit_mib)])
    source = "re-costed now" if recosted else "as recorded in the files; --model/--cluster re-costs them"
    lines += ["", f"predicted effect ({source})"] + format_table(["", name_a, name_b, "delta", "delta %"], rows,
                                                      right={1, 2, 3, 4})
    return "\n".join(lines)
