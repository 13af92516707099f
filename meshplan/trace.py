"""`meshplan show plan.yaml --trace predicted.json`: the predicted step as a Chrome trace (Perfetto,
chrome://tracing), to lay beside the torch.profiler traces `meshplan execute --profile DIR` records.

One process per pipeline rank (pid = pipeline rank, named like the profiler's `rank R` traces), three rows:
- `compute`: forward and backward of every micro-batch and stage, in torch's own order and at the times
  meshplan/timeline.py simulates from the plan's per-stage predictions (which include each stage's tensor-parallel
  collectives and pipeline sends);
- `communication`: what the step time holds after the last backward beyond the schedule and the optimizer (the
  exposed data-parallel gradient synchronisation and the rest of the predicted communication and offload);
- `optimizer`: the predicted optimizer step.
Times are predicted milliseconds written as the format's microseconds (`ts`, `dur`).
"""

from __future__ import annotations

import json
from pathlib import Path

from meshplan.timeline import FORWARD, plan_timeline
from planner.plan import Plan

US_PER_MS = 1000.0
THREADS = {"compute": 0, "communication": 1, "optimizer": 2}


def predicted_trace(plan: Plan) -> dict:
    """The trace as a JSON-ready dict (`traceEvents`, complete events `ph: X`, metadata naming ranks and rows)."""
    boxes, note = plan_timeline(plan)
    predicted = plan.predicted
    makespan_ms = max(box.end_ms for box in boxes)
    tail_ms = max(0.0, predicted.step_time_ms - makespan_ms - predicted.optimizer_ms)
    events = []
    for rank in range(plan.mesh.pp):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"pipeline rank {rank}"}})
        for name, tid in THREADS.items():
            events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": name}})
    for box in boxes:
        action = box.action
        kind = "forward" if action.computation_type == FORWARD else "backward"
        events.append({"name": f"{kind} mb{action.microbatch_index} stage {action.stage_index}", "cat": kind,
                       "ph": "X", "pid": box.rank, "tid": THREADS["compute"], "ts": box.start_ms * US_PER_MS,
                       "dur": (box.end_ms - box.start_ms) * US_PER_MS,
                       "args": {"microbatch": action.microbatch_index, "stage": action.stage_index}})
    for rank in range(plan.mesh.pp):
        if tail_ms > 0:
            events.append({"name": "communication after the last backward", "cat": "communication", "ph": "X",
                           "pid": rank, "tid": THREADS["communication"], "ts": makespan_ms * US_PER_MS,
                           "dur": tail_ms * US_PER_MS,
                           "args": {"predicted_communication_ms": predicted.communication_ms,
                                    "predicted_offload_ms": predicted.offload_ms}})
        events.append({"name": "optimizer step", "cat": "optimizer", "ph": "X", "pid": rank,
                       "tid": THREADS["optimizer"], "ts": (makespan_ms + tail_ms) * US_PER_MS,
                       "dur": predicted.optimizer_ms * US_PER_MS})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"source": "meshplan predicted schedule", "model": plan.model.source,
                          "step_time_ms": predicted.step_time_ms, "schedule": plan.pipeline.schedule,
                          "note": note}}


def write_predicted_trace(plan: Plan, path: str) -> dict:
    trace = predicted_trace(plan)
    Path(path).write_text(json.dumps(trace))
    return trace
