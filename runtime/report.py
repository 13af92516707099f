"""RunReport: measured step time and peak memory per rank beside the plan's predictions."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from runtime.train import RankResult, median_step_time_s

MIB = 2**20


@dataclass
class RunReport:
    """The outcome of `execute`: losses, and measured vs predicted time and memory."""

    world_size: int
    mesh: dict[str, int]
    steps: int
    losses: list[float]
    predicted_step_time_ms: float
    measured_step_time_ms: float
    """Median over timed steps of the slowest rank."""
    predicted_peak_memory_mib: float
    measured_peak_memory_mib: float
    """Largest peak over ranks."""
    ranks: list[RankResult]
    setup: str = ""
    """One line: data-parallel kind, precision, micro-batches, checkpointed and offloaded layers."""
    predicted_breakdown_mib: dict[str, float] = field(default_factory=dict)
    """Predicted parameters / gradients / optimizer states / activations, keyed like MemTracker's categories."""
    plan_yaml: str = ""
    """The plan that ran, as its YAML (what `meshplan calibrate --from-runs` re-costs)."""
    model_fingerprint: str = ""
    """The plan's model graph fingerprint (`--from-runs` refuses to mix models)."""
    plan_dir: str = ""
    """The folder a relative MODEL path in the plan is resolved from (the plan file's folder when it ran)."""
    machine_step_time_ms: float | None = None
    """The plan re-costed on this machine as the run measured it (CPU runs: `machine_profile` of rank 0)."""
    machine_breakdown_ms: dict[str, float] = field(default_factory=dict)
    """The parts of `machine_step_time_ms`: compute, recompute, communication, offload, optimizer, bubble."""
    machine_note: str = ""
    """Why the plan was not re-costed on the measured machine, when it was measured but could not be."""

    @classmethod
    def from_ranks(cls, plan, steps: int, ranks: list[RankResult]) -> RunReport:
        mesh = {"pp": plan.mesh.pp, "dp": plan.mesh.dp, "tp": plan.mesh.tp}
        predicted = plan.predicted
        breakdown = {"Parameter": predicted.parameters_mib, "Gradient": predicted.gradients_mib,
                     "Optstate": predicted.optimizer_states_mib,
                     # working buffers (rematerialised activations, gathered ZeRO-3 layers) as before they
                     # were split out: the tracker has no category that matches them alone
                     "Activation": predicted.activations_mib + (predicted.buffers_mib or 0.0)}
        return cls(world_size=plan.world_size, mesh=mesh, steps=steps,
                   losses=ranks[0].losses, predicted_step_time_ms=plan.predicted.step_time_ms,
                   measured_step_time_ms=max(median_step_time_s(r) for r in ranks) * 1e3,
                   predicted_peak_memory_mib=plan.predicted.peak_memory_mib,
                   measured_peak_memory_mib=max(r.peak_memory_bytes for r in ranks) / MIB, ranks=ranks,
                   setup=describe_setup(plan), predicted_breakdown_mib=breakdown, plan_yaml=plan.to_yaml(),
                   model_fingerprint=plan.model.fingerprint)

    @property
    def cluster_name(self) -> str:
        """Name of the cluster profile the plan was priced on ("" for reports without the plan)."""
        if not self.plan_yaml:
            return ""
        import yaml

        data = yaml.safe_load(self.plan_yaml)
        return str(data.get("cluster", {}).get("name", "")) if isinstance(data, dict) else ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> RunReport:
        data = json.loads(text)
        data["ranks"] = [RankResult(**r) for r in data["ranks"]]
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    def format(self) -> str:
        lines = [f"ran {self.steps} steps on {self.world_size} ranks (pp={self.mesh['pp']} x dp={self.mesh['dp']} "
                 f"x tp={self.mesh['tp']})"]
        if self.setup:
            lines.append(self.setup)
        lines += ["", "step  loss        step time (ms, slowest rank)"]
        tracked = self.ranks[0].tracked_step if self.ranks else -1
        first = self.ranks[0].first_step if self.ranks else 0  # > 0 when resumed from a checkpoint
        for i, loss in enumerate(self.losses):
            times = [r.every_step_time_s[i] for r in self.ranks if len(r.every_step_time_s) > i]
            time_text = f"{max(times) * 1e3:>12.3f}" if times else f"{'':>12}"
            step = first + i
            note = "  (warm-up)" if i == 0 and len(self.losses) > 1 else "  (memory tracked)" if step == tracked else ""
            lines.append(f"{step:>4}  {loss:.6f}  {time_text}{note}")
        lines += ["", f"{'':<26}{'predicted':>12}{'measured':>12}{'error':>9}"]

        def row(name: str, predicted: float, measured: float) -> str:
            if measured:
                error_text = f"{(predicted - measured) / measured:>+9.0%}"
            else:  # nothing measured: an error ratio means nothing (0 predicted too is exact)
                error_text = f"{'exact' if predicted == 0 else 'n/a':>9}"
            return f"{name:<26}{predicted:>12.3f}{measured:>12.3f}{error_text}"

        cluster_name = self.cluster_name
        planned_on = f"  as planned, on {cluster_name!r}" if cluster_name else ""
        if math.isnan(self.measured_step_time_ms):  # every step ran was warm-up or memory tracking
            lines.append(f"{'step time (ms)':<26}{self.predicted_step_time_ms:>12.3f}  {TOO_FEW_STEPS}{planned_on}")
        else:
            lines.append(row("step time (ms)", self.predicted_step_time_ms, self.measured_step_time_ms) + planned_on)
        if self.machine_step_time_ms is not None and not math.isnan(self.measured_step_time_ms):
            lines.append(row("  on this machine", self.machine_step_time_ms, self.measured_step_time_ms)
                         + "  re-costed on the machine as measured in this run")
        elif self.machine_note:
            lines.append(f"  (not re-costed on the measured machine: {self.machine_note})")
        lines.append(row("peak memory (MiB/rank)", self.predicted_peak_memory_mib, self.measured_peak_memory_mib))
        fullest = max(self.ranks, key=lambda r: r.peak_memory_bytes) if self.ranks else None
        if fullest is not None and fullest.memory_breakdown_bytes:
            for category, predicted_mib in self.predicted_breakdown_mib.items():
                measured_mib = fullest.memory_breakdown_bytes.get(category, 0) / MIB
                lines.append(row(f"  {category.lower()} at peak", predicted_mib, measured_mib))
        lines += ["", "rank  step time (ms, median)  peak memory (MiB)  predicted (MiB)"]
        for r in self.ranks:
            median_ms = median_step_time_s(r) * 1e3
            median_text = f"{median_ms:>22.3f}" if not math.isnan(median_ms) else f"{'too few steps':>22}"
            lines.append(f"{r.rank:>4}  {median_text}  {r.peak_memory_bytes / MIB:>17.3f}"
                         f"  {self.predicted_peak_memory_mib:>15.3f}")
        return "\n".join(lines)


TOO_FEW_STEPS = ("too few steps to time: the first step warms up and the second tracks memory; run 3 or more "
                 "(--steps 3)")


def describe_setup(plan) -> str:
    """The plan's data-parallel and memory choices in one line, e.g. `zero3 (replicate 2), bfloat16/float32, ...`."""
    dpp = plan.data_parallel
    parts = [dpp.kind + (f" (HSDP replicate {dpp.replicate})" if dpp.replicate > 1 else "")
             + (", keep params after forward" if dpp.kind == "zero3" and not dpp.reshard_after_forward else "")
             + (", CPU offload" if dpp.offload else "")]
    parts.append(f"compute {plan.precision.param_dtype}, reduce {plan.precision.reduce_dtype}")
    parts.append(f"{plan.pipeline.num_microbatches} micro-batch(es) per step")
    for kind in ("full", "selective"):
        count = sum(layer.checkpoint == kind for layer in plan.layers)
        if count:
            parts.append(f"{kind} checkpointing on {count} layer(s)")
    offloaded = sum(layer.offload_activations for layer in plan.layers)
    if offloaded:
        parts.append(f"activations offloaded on {offloaded} layer(s)")
    return "; ".join(parts)
