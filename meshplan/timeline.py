"""`meshplan show --timeline FILE.png`: the plan's pipeline schedule drawn as a Gantt chart.

The order of actions on every pipeline rank is torch.distributed.pipelining's own, for the schedule class the
runtime runs (runtime/pipeline.py SCHEDULE_CLASSES), never re-derived here:
- multi-stage schedules (interleaved 1F1B) run their `pipeline_order`, which
  `torch.distributed.pipelining._schedule_visualizer.get_schedule_ops` builds on mock stages;
- single-stage schedules (GPipe, 1F1B) run the loop in their `_step_microbatches`, which is recorded by running
  it on a mock `PipelineStage` whose `forward_one_chunk` / `backward_one_chunk` append the action. (Their
  `pipeline_order` is only a description, and in torch 2.13 `Schedule1F1B`'s is wrong on the last rank: it
  starts at micro-batch 1 and names a micro-batch that does not exist. The recorded loop is what runs.)
Without a pipeline (pp = 1) the runtime runs forward then backward of each micro-batch in turn (gradient
accumulation, runtime/train.py forward_backward).

Timing: every action lasts its stage's predicted forward or backward time per micro-batch (Prediction.stages)
and starts when its rank is free and its input is ready: the forward of stage s after the forward of s - 1,
the backward of s after the backward of s + 1 (the last stage's after its own forward). Pipeline sends are
inside the stage times; idle time on a rank is the bubble. Optimizer and data-parallel work after the last
backward are not drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from unittest import mock

import torch
from torch.distributed.pipelining.schedules import _Action, _ComputationType

from planner.plan import Plan
from planner.plan_schema import PlanError

FORWARD, BACKWARD = _ComputationType.FORWARD, _ComputationType.FULL_BACKWARD


@dataclass(frozen=True)
class Box:
    """One drawn action."""

    rank: int
    action: _Action
    start_ms: float
    end_ms: float


def _recorded_single_stage_order(schedule_class: type, pp: int, num_microbatches: int) -> dict[int, list[_Action]]:
    """Run a single-stage schedule's `_step_microbatches` on mock stages and record what each rank computes."""
    from torch.distributed.pipelining.stage import PipelineStage

    order: dict[int, list[_Action]] = {}
    for rank in range(pp):
        actions: list[_Action] = []
        stage = mock.create_autospec(PipelineStage, instance=True)
        stage.group_rank, stage.group_size, stage.num_stages, stage.stage_index = rank, pp, pp, rank
        stage.is_first, stage.is_last, stage.submod = rank == 0, rank == pp - 1, None
        for p2p in ("get_fwd_recv_ops", "get_fwd_send_ops", "get_bwd_recv_ops", "get_bwd_send_ops"):
            getattr(stage, p2p).return_value = []  # no communication: only the order of compute matters
        stage.forward_one_chunk.side_effect = \
            lambda mb, *a, _s=rank, _acts=actions, **k: _acts.append(_Action(_s, FORWARD, mb))
        stage.backward_one_chunk.side_effect = \
            lambda mb, *a, _s=rank, _acts=actions, **k: _acts.append(_Action(_s, BACKWARD, mb))
        schedule = schedule_class(stage, num_microbatches)
        schedule._initialize_stage = lambda *args, **kwargs: None  # shape inference needs a real stage
        schedule._step_microbatches()
        order[rank] = actions
    return order


def schedule_order(schedule: str, pp: int, num_microbatches: int, virtual_stages: int = 1
                   ) -> dict[int, list[_Action]]:
    """Forward and backward actions of every pipeline rank, in the order torch runs them."""
    if schedule == "none" or pp == 1:
        return {0: [_Action(0, kind, mb) for mb in range(num_microbatches) for kind in (FORWARD, BACKWARD)]}
    from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle

    from runtime.pipeline import SCHEDULE_CLASSES

    if schedule not in SCHEDULE_CLASSES:
        raise PlanError(f"pipeline.schedule {schedule!r} has no torch schedule; use one of "
                        f"{sorted(SCHEDULE_CLASSES)}")
    schedule_class = SCHEDULE_CLASSES[schedule]
    try:
        if issubclass(schedule_class, PipelineScheduleSingle):
            return _recorded_single_stage_order(schedule_class, pp, num_microbatches)
        ops = get_schedule_ops(schedule_class, pp, num_microbatches, virtual_stages)
    except (AttributeError, TypeError) as err:  # private pipelining helpers this module reads changed
        raise RuntimeError(f"cannot read the order of {schedule_class.__name__} from torch {torch.__version__}'s "
                           f"pipelining schedules ({err}); meshplan's timeline was written against torch 2.13") \
            from err
    return {rank: [a for a in actions if a is not None and a.computation_type in (FORWARD, BACKWARD)]
            for rank, actions in enumerate(ops)}


def stage_times_ms(plan: Plan) -> tuple[list[tuple[float, float]], str]:
    """(forward, backward) ms per micro-batch of every stage, and a note when they had to be estimated.

    Plans written before Prediction.stages existed get their layers' predicted time per micro-batch, split
    one third forward, two thirds backward (backward does about twice the forward's matmul FLOPs)."""
    stages = plan.predicted.stages
    if len(stages) == plan.num_stages:
        return [(s.forward_ms, s.backward_ms) for s in stages], ""
    times = []
    for stage in range(plan.num_stages):
        total = sum(layer.predicted_time_ms for layer in plan.layers if layer.stage == stage)
        total /= plan.pipeline.num_microbatches
        times.append((total / 3, 2 * total / 3))
    return times, "stage times estimated from the layers (forward:backward = 1:2); re-plan for exact ones"


def simulate(order: dict[int, list[_Action]], times_ms: list[tuple[float, float]]) -> list[Box]:
    """Start and end of every action: as soon as its rank is free and its input has arrived."""
    num_stages = len(times_ms)
    end: dict[tuple[int, _ComputationType, int], float] = {}
    free = dict.fromkeys(order, 0.0)
    position = dict.fromkeys(order, 0)
    boxes: list[Box] = []

    def ready_at(action: _Action) -> float | None:
        s, mb = action.stage_index, action.microbatch_index
        if action.computation_type == FORWARD:
            needs = (s - 1, FORWARD, mb) if s > 0 else None
        else:
            needs = (s + 1, BACKWARD, mb) if s < num_stages - 1 else (s, FORWARD, mb)
        if needs is None:
            return 0.0
        return end.get(needs)

    remaining = sum(len(actions) for actions in order.values())
    while remaining:
        progressed = False
        for rank, actions in order.items():
            while position[rank] < len(actions):
                action = actions[position[rank]]
                ready = ready_at(action)
                if ready is None:
                    break
                forward_ms, backward_ms = times_ms[action.stage_index]
                start = max(free[rank], ready)
                finish = start + (forward_ms if action.computation_type == FORWARD else backward_ms)
                end[(action.stage_index, action.computation_type, action.microbatch_index)] = finish
                free[rank] = finish
                boxes.append(Box(rank, action, start, finish))
                position[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: str(a[position[r]]) for r, a in order.items() if position[r] < len(a)}
            raise RuntimeError(f"the schedule cannot proceed: ranks wait on each other at {stuck}")
    return boxes


def plan_timeline(plan: Plan) -> tuple[list[Box], str]:
    """The plan's boxes (per rank in torch's order) and a note about estimated times ('' if exact)."""
    order = schedule_order(plan.pipeline.schedule, plan.mesh.pp, plan.pipeline.num_microbatches,
                           plan.pipeline.virtual_stages)
    times, note = stage_times_ms(plan)
    return simulate(order, times), note


def draw_timeline(plan: Plan, path: str) -> list[Box]:
    """Draw the schedule to `path` (PNG by its extension) with matplotlib's Agg backend; returns the boxes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    boxes, note = plan_timeline(plan)
    pp, m, v = plan.mesh.pp, plan.pipeline.num_microbatches, plan.pipeline.virtual_stages
    makespan = max(b.end_ms for b in boxes)
    colours = plt.get_cmap("tab20" if m > 10 else "tab10")
    fig, ax = plt.subplots(figsize=(min(40.0, max(8.0, 4 + 0.45 * len(boxes) / pp)), 1.2 + 0.7 * pp))
    for rank in range(pp):
        y = pp - 1 - rank
        ax.barh(y, makespan, left=0, height=0.8, color="#eeeeee", edgecolor="none")  # idle = bubble
        busy = sum(b.end_ms - b.start_ms for b in boxes if b.rank == rank)
        ax.text(makespan * 1.005, y, f"idle {1 - busy / makespan:.0%}", va="center", fontsize=8)
    for box in boxes:
        a = box.action
        forward = a.computation_type == FORWARD
        colour = colours(a.microbatch_index % colours.N)
        ax.barh(pp - 1 - box.rank, box.end_ms - box.start_ms, left=box.start_ms, height=0.8, color=colour,
                alpha=1.0 if forward else 0.55, hatch=None if forward else "//", edgecolor="black", linewidth=0.5)
        if box.end_ms - box.start_ms > makespan / 80:
            label = ("F" if forward else "B") + str(a.microbatch_index) + (f"\ns{a.stage_index}" if v > 1 else "")
            ax.text((box.start_ms + box.end_ms) / 2, pp - 1 - box.rank, label, ha="center", va="center",
                    fontsize=7)
    ax.set_yticks(range(pp))
    ax.set_yticklabels([f"rank {r}\n(stages {','.join(str(s) for s in range(r, plan.num_stages, pp))})"
                        if v > 1 else f"rank {r}\n(stage {r})" for r in reversed(range(pp))])
    ax.set_xlim(0, makespan * 1.08)
    ax.set_xlabel("time (ms, predicted)")
    if pp == 1:
        title = f"no pipeline (pp = 1): {m} micro-batch(es) one after another (gradient accumulation)"
    else:
        busy = sum(b.end_ms - b.start_ms for b in boxes)
        title = (f"{plan.pipeline.schedule}, pp={pp}" + (f" x {v} stages per rank" if v > 1 else "")
                 + f", {m} micro-batches: forward/backward {makespan:.3f} ms, idle (bubble and imbalance) "
                 f"{1 - busy / (pp * makespan):.0%}")
    ax.set_title(title + (f"\n{note}" if note else ""), fontsize=10)
    fig.legend(handles=[Patch(facecolor="#888888", edgecolor="black", label="forward (colour: micro-batch)"),
                        Patch(facecolor="#888888", alpha=0.55, hatch="//", edgecolor="black", label="backward"),
                        Patch(facecolor="#eeeeee", label="idle (bubble)")],
               loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.35 / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return boxes
