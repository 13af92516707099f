"""`execute(plan)`: run a plan on every rank, launching torchrun when not already inside one.

Inside torchrun (RANK/WORLD_SIZE set) each rank trains and rank 0 prints the report. Outside it, a plan for
one rank runs in this process through the same code path (a process group of one); a plan for N ranks is
saved and handed to `torchrun --standalone --nproc-per-node=N -m meshplan.cli execute`, and the report comes
back through a JSON file.
"""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch.distributed as dist

from planner.model_graph import build_model_graph
from planner.model_spec import load_model_spec
from planner.plan import Plan
from planner.plan_schema import PlanError
from runtime.checkpointing import CheckpointOptions, resume_step
from runtime.report import RunReport
from runtime.train import check_runtime_supports, run_rank


def inside_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def check_plan_matches_model(plan: Plan, plan_dir: Path | None) -> None:
    """Refuse a plan whose model graph changed since planning (traced on the meta device, no weights)."""
    spec = load_model_spec(plan.model.source, base_dir=plan_dir, device="meta")
    fingerprint = build_model_graph(spec).fingerprint
    if fingerprint != plan.model.fingerprint:
        raise PlanError(f"the plan was made for a different model: fingerprint {plan.model.fingerprint} in the "
                        f"plan, {fingerprint} for {plan.model.source} now. Re-run `meshplan plan`.")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_in_this_process_group(plan: Plan, steps: int, plan_dir: Path | None,
                              checkpoint: CheckpointOptions | None = None) -> RunReport:
    """Train on this rank and gather every rank's result into one report (returned on every rank)."""
    result = run_rank(plan, steps, plan_dir, checkpoint)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    return RunReport.from_ranks(plan, steps, gathered)


def run_plan_in_torchrun(plan: Plan, steps: int, plan_dir: Path | None, report_path=None,
                         quiet: bool = False, checkpoint: CheckpointOptions | None = None) -> RunReport:
    """This rank's part of a torchrun job: init the process group, train, gather; rank 0 prints and saves."""
    backend = "nccl" if plan.cluster.get("backend") == "nccl" else "gloo"
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend)
    try:
        report = run_in_this_process_group(plan, steps, plan_dir, checkpoint)
        gc.collect()  # free sharded models (FSDP2/DDP keep reference cycles) while their process groups live;
        # otherwise gloo work objects can die in interpreter teardown (SIGABRT, pytorch/pytorch#179291)
        dist.barrier()  # no rank tears gloo down while a peer still talks to it
    finally:
        if owns_group:
            dist.destroy_process_group()
    if int(os.environ["RANK"]) == 0:
        if report_path:
            report.save(report_path)
        if not quiet:
            print(report.format(), flush=True)
    return report


def execute(plan: Plan | str | os.PathLike, steps: int = 5, report_path: str | os.PathLike | None = None,
            quiet: bool = False, checkpoint_dir: str | os.PathLike | None = None,
            checkpoint_every: int | None = None, resume: bool = False) -> RunReport:
    """Run training steps 0 .. `steps` - 1 of `plan` (a Plan or a plan YAML path) and return the RunReport.

    With `checkpoint_dir`, model and optimizer state are saved there with torch.distributed.checkpoint every
    `checkpoint_every` steps and after the last; `resume` starts from the latest checkpoint there (any mesh).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PlanError(f"steps must be a positive integer, got {steps!r}")
    checkpoint = None
    if checkpoint_dir is not None:
        checkpoint = CheckpointOptions(checkpoint_dir, checkpoint_every, resume)
        checkpoint.validate()
    elif checkpoint_every is not None or resume:
        raise PlanError("checkpoint_every and resume need checkpoint_dir (where checkpoints are written and read)")
    plan_dir = None
    if not isinstance(plan, Plan):
        plan_dir = Path(plan).resolve().parent
        plan = Plan.load(plan)
    if inside_torchrun():
        return run_plan_in_torchrun(plan, steps, plan_dir, report_path, quiet, checkpoint)

    check_runtime_supports(plan)
    if checkpoint is not None and checkpoint.resume:
        resume_step(checkpoint.directory, plan, steps)
    check_plan_matches_model(plan, plan_dir)
    with tempfile.TemporaryDirectory(prefix="meshplan-") as tmp:
        report_file = Path(report_path) if report_path else Path(tmp) / "report.json"
        if plan_dir is None:
            plan_dir = Path.cwd()
        plan_file = Path(tmp) / "plan.yaml"
        plan.save(plan_file)
        env = dict(os.environ, MESHPLAN_PLAN_DIR=str(plan_dir))
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
                   f"--nproc-per-node={plan.world_size}", "--rdzv-backend=c10d",
                   f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "-m", "meshplan.cli", "execute", str(plan_file),
                   "--steps", str(steps), "--report-json", str(report_file)]
        if quiet:
            command.append("--quiet")
        if checkpoint is not None:
            command += checkpoint.cli_args()
        completed = subprocess.run(command, env=env)
        if completed.returncode != 0:
            raise RuntimeError(f"torchrun exited with status {completed.returncode}; see the rank output above")
        return RunReport.from_json(report_file.read_text())
