"""`meshplan show`: a plan as tables a person can check at a glance.

Four tables: the mesh and which global ranks form each pipeline stage, data-parallel group and tensor-parallel
group (laid out as runtime/train.py's `init_device_mesh(..., (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))`
lays them out: row-major, tp fastest); the stages with their layers and per-layer choices and predictions;
per-device memory against the limit; and the predicted step time by component. `--why` adds the alternatives
the search priced.
"""

from __future__ import annotations

import torch

from planner.plan import Plan, Prediction

BAR_WIDTH = 24
MAX_GROUPS_SHOWN = 6
MAX_RANKS_LISTED = 6
GROUPS_WIDTH = 56  # with the first three columns, a rank-layout row stays within 120 columns


def format_table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> list[str]:
    """Lines of a plain-text table; columns in `right` are right-aligned (numbers)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """A text bar, `#` for the filled share; `!` marks the part beyond 100%."""
    fraction = max(0.0, fraction)
    filled = min(width, round(fraction * width))
    over = "!" if fraction > 1 else ""
    return "[" + "#" * filled + "." * (width - filled) + "]" + over


def rank_grid(plan: Plan) -> torch.Tensor:
    """Global rank at (pp, dp, tp) coordinates: the mesh tensor init_device_mesh builds for the plan."""
    return torch.arange(plan.world_size).reshape(plan.mesh.pp, plan.mesh.dp, plan.mesh.tp)


def rank_groups(plan: Plan) -> dict[str, list[list[int]]]:
    """Ranks of every pipeline stage, data-parallel group and tensor-parallel group (with HSDP, every shard and
    replica group: runtime/data_parallel.py unflattens dp into (replicate, shard), shard fastest; with tensor2d
    layers, each grid's rows-axis groups (weights gathered) and cols-axis groups (activations gathered))."""
    grid = rank_grid(plan)
    pp, dp, tp = grid.shape
    groups = {"pipeline rank": [grid[p].flatten().tolist() for p in range(pp)],
              "pp group": [grid[:, d, t].tolist() for d in range(dp) for t in range(tp)],
              "dp group": [grid[p, :, t].tolist() for p in range(pp) for t in range(tp)],
              "tp group": [grid[p, d, :].tolist() for p in range(pp) for d in range(dp)]}
    for rows in sorted({layer.tp_rows for layer in plan.layers if layer.tp_rows}):
        # tensor2d grids (runtime/tensor_parallel_2d.py): tp as rows x cols, cols fastest
        cols = tp // rows
        tiles = [grid[p, d, :].reshape(rows, cols) for p in range(pp) for d in range(dp)]
        groups[f"tp {rows}x{cols} rows axis"] = [t[:, c].tolist() for t in tiles for c in range(cols)]
        groups[f"tp {rows}x{cols} cols axis"] = [t[r, :].tolist() for t in tiles for r in range(rows)]
    replicate = plan.data_parallel.replicate
    if replicate > 1:
        hsdp = grid.reshape(pp, replicate, dp // replicate, tp)
        groups["dp shard group"] = [hsdp[p, r, :, t].tolist() for p in range(pp) for r in range(replicate)
                                    for t in range(tp)]
        groups["dp replicate group"] = [hsdp[p, :, s, t].tolist() for p in range(pp)
                                        for s in range(dp // replicate) for t in range(tp)]
    return groups


def _ranks(ranks: list[int]) -> str:
    """A rank list as a range `a-b`, an arithmetic run `a,b,..,z` (stride b - a), or the first few and a count:
    a dp group of 1,024 ranks stays one short cell."""
    if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    stride = ranks[1] - ranks[0] if len(ranks) > 1 else 0
    if len(ranks) > 3 and stride > 0 and ranks == list(range(ranks[0], ranks[-1] + 1, stride)):
        return f"{ranks[0]},{ranks[1]},..,{ranks[-1]}"
    if len(ranks) > MAX_RANKS_LISTED:
        return ",".join(map(str, ranks[:MAX_RANKS_LISTED - 1])) + f",..,{ranks[-1]} ({len(ranks)} ranks)"
    return ",".join(map(str, ranks))


def _groups(groups: list[list[int]]) -> str:
    """The first groups that fit in GROUPS_WIDTH characters (at least one), then how many there are."""
    shown = []
    for group in groups[:MAX_GROUPS_SHOWN]:
        cell = f"[{_ranks(group)}]"
        if shown and len(" ".join([*shown, cell])) > GROUPS_WIDTH:
            break
        shown.append(cell)
    more = f" ... ({len(groups)} groups)" if len(shown) < len(groups) else ""
    return " ".join(shown) + more


def format_mesh(plan: Plan) -> list[str]:
    mesh, dpp, pipe = plan.mesh, plan.data_parallel, plan.pipeline
    flavour = dpp.kind + (f", HSDP {dpp.replicate} replicas x {mesh.dp // dpp.replicate} shards"
                          if dpp.replicate > 1 else "") + (", states offloaded to the host" if dpp.offload else "")
    if dpp.kind == "zero3" and not dpp.reshard_after_forward:
        flavour += ", parameters kept gathered after forward"
    schedule = "no pipeline" if mesh.pp == 1 else pipe.schedule + (
        f" with {pipe.virtual_stages} stages per rank" if pipe.virtual_stages > 1 else "")
    lines = [f"model      {plan.model.source}  ({plan.model.num_parameters:,} parameters, global batch "
             f"{plan.model.global_batch_size})",
             f"cluster    {plan.cluster.get('name')}, world size {plan.world_size}",
             f"mesh       pp={mesh.pp} x dp={mesh.dp} x tp={mesh.tp}  (DeviceMesh dims pp, dp, tp; tp fastest)",
             f"data       {flavour}; precision {plan.precision.param_dtype} (reduce {plan.precision.reduce_dtype})",
             f"schedule   {schedule}; {pipe.num_microbatches} micro-batch(es) of {plan.micro_batch_size} per "
             "dp rank"]
    if mesh.tp > 1 and all(layer.strategy == "replicate" for layer in plan.layers):
        lines.append(f"note       tp={mesh.tp} but no layer is sharded over it: the {mesh.tp} ranks of each tp group "
                     "repeat the same work. The cost model found that cheaper than more data parallelism on this "
                     f"cluster; {plan.world_size // mesh.tp} devices would train as fast.")
    lines.append("")
    rows = []
    for name, groups in rank_groups(plan).items():
        shown = "every rank alone (axis of size 1)" if len(groups[0]) == 1 else _groups(groups)
        rows.append([name, str(len(groups)), str(len(groups[0])), shown])
    return lines + format_table(["rank layout", "groups", "size", "global ranks"], rows, right={1, 2})


def format_stages(plan: Plan) -> list[str]:
    """The layers in a table, under a line per pipeline stage (rank, forward and backward time per micro-batch)."""
    p = plan.predicted
    rows, stage_of_row = [], []
    for layer in plan.layers:
        units = "; ".join(f"{','.join(u.colwise)}->{u.rowwise}" for u in layer.tensor_parallel) or "-"
        strategy = f"tensor2d {layer.tp_rows}x{plan.mesh.tp // layer.tp_rows}" if layer.tp_rows else layer.strategy
        rows.append([f"  {layer.path or '<root>'}", strategy, units, "yes" if layer.sequence_parallel else "-",
                     layer.checkpoint, "yes" if layer.offload_activations else "-", f"{layer.predicted_time_ms:.3f}",
                     f"{layer.predicted_memory_mib:.3f}"])
        stage_of_row.append(layer.stage)
    table = format_table(["layer", "strategy", "tensor-parallel units", "sp", "checkpoint", "offload", "time ms",
                          "memory MiB"], rows, right={6, 7})
    lines = table[:2]
    for i, (line, stage) in enumerate(zip(table[2:], stage_of_row, strict=True)):
        if plan.mesh.pp > 1 and (i == 0 or stage != stage_of_row[i - 1]):
            timing = "" if stage >= len(p.stages) else (f": forward {p.stages[stage].forward_ms:.3f} ms, backward "
                                                        f"{p.stages[stage].backward_ms:.3f} ms per micro-batch")
            lines.append(f"stage {stage} on pipeline rank {stage % plan.mesh.pp}{timing}")
        lines.append(line)
    return lines


def memory_parts_mib(p: Prediction) -> list[tuple[str, float]]:
    """The peak's parts; a plan written before `buffers_mib` existed counts buffers in activations."""
    activations = "activations" if p.buffers_mib is not None else "activations + buffers"
    parts = [("parameters", p.parameters_mib), ("gradients", p.gradients_mib),
             ("optimizer states", p.optimizer_states_mib), (activations, p.activations_mib)]
    return parts + ([("buffers", p.buffers_mib)] if p.buffers_mib is not None else [])


def time_parts_ms(p: Prediction) -> list[tuple[str, float]]:
    """The step's parts on the slowest rank; before `offload_ms` existed offload counts as communication."""
    communication = "communication" if p.offload_ms is not None else "communication + offload"
    parts = [("compute", p.compute_ms - p.recompute_ms), ("recompute", p.recompute_ms),
             (communication, p.communication_ms)]
    parts += [("offload", p.offload_ms)] if p.offload_ms is not None else []
    return parts + [("optimizer", p.optimizer_ms), ("pipeline bubble", p.bubble_ms)]


def format_memory(plan: Plan) -> list[str]:
    p = plan.predicted
    limit = p.memory_limit_mib
    rows = [[name, f"{mib:.3f}", f"{mib / limit:.1%}", bar(mib / limit)] for name, mib in memory_parts_mib(p)]
    rows.append(["peak", f"{p.peak_memory_mib:.3f}", f"{p.peak_memory_mib / limit:.1%}",
                 bar(p.peak_memory_mib / limit)])
    return [f"memory per device (fullest rank) against the limit of {limit:,.1f} MiB"] + format_table(
        ["part", "MiB", "of limit", ""], rows, right={1, 2})


def format_time(plan: Plan) -> list[str]:
    p = plan.predicted
    step = p.step_time_ms or 1.0
    rows = [[name, f"{ms:.3f}", f"{ms / step:.1%}", bar(ms / step)] for name, ms in time_parts_ms(p)]
    rows.append(["step", f"{p.step_time_ms:.3f}", "100.0%", ""])
    return ["predicted step time (slowest rank)"] + format_table(["part", "ms", "of step", ""], rows,
                                                                 right={1, 2})


def format_alternatives(plan: Plan) -> list[str]:
    if not plan.alternatives:
        return ["alternatives: none (the mesh and data-parallel flavour were pinned)"]
    rows = [[a.summary, f"{a.step_time_ms:.3f}", f"{a.peak_memory_mib:.3f}", a.why_not] for a in plan.alternatives]
    return ["alternatives considered (best of each other shape)"] + format_table(
        ["configuration", "step ms", "peak MiB", "why not"], rows, right={1, 2})


def format_plan(plan: Plan, why: bool = False) -> str:
    """The mesh and rank layout, the stages and layers, memory and step time (and alternatives if `why`)."""
    sections = [format_mesh(plan), format_stages(plan), format_memory(plan), format_time(plan)]
    if why:
        sections.append(format_alternatives(plan))
    return "\n\n".join("\n".join(s) for s in sections)
