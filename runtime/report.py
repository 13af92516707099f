"""RunReport: measured step time and peak memory per rank beside the plan's predictions."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
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

    @classmethod
    def from_ranks(cls, plan, steps: int, ranks: list[RankResult]) -> RunReport:
        mesh = {"pp": plan.mesh.pp, "dp": plan.mesh.dp, "tp": plan.mesh.tp}
        return cls(world_size=plan.world_size, mesh=mesh, steps=steps,
                   losses=ranks[0].losses, predicted_step_time_ms=plan.predicted.step_time_ms,
                   measured_step_time_ms=max(median_step_time_s(r) for r in ranks) * 1e3,
                   predicted_peak_memory_mib=plan.predicted.peak_memory_mib,
                   measured_peak_memory_mib=max(r.peak_memory_bytes for r in ranks) / MIB, ranks=ranks)

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
        lines = [f"ran {self.steps} steps on {self.world_size} ranks (pp={self.mesh['pp']} x dp={self.mesh['dp']} x "
                 f"tp={self.mesh['tp']})",
                 "", "step  loss"]
        lines += [f"{i:>4}  {loss:.6f}" for i, loss in enumerate(self.losses)]
        lines += ["", f"{'':<26}{'predicted':>12}{'measured':>12}{'error':>9}"]

        def row(name: str, predicted: float, measured: float) -> str:
            error = (predicted - measured) / measured if measured else float("nan")
            return f"{name:<26}{predicted:>12.3f}{measured:>12.3f}{error:>+9.0%}"

        lines.append(row("step time (ms)", self.predicted_step_time_ms, self.measured_step_time_ms))
        lines.append(row("peak memory (MiB/rank)", self.predicted_peak_memory_mib, self.measured_peak_memory_mib))
        lines += ["", "rank  step time (ms, median)  peak memory (MiB)"]
        for r in self.ranks:
            lines.append(f"{r.rank:>4}  {median_step_time_s(r) * 1e3:>22.3f}  {r.peak_memory_bytes / MIB:>17.3f}")
        return "\n".join(lines)
