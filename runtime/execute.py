"""`execute(plan)`: run a plan on every rank, launching torchrun when not already inside one.

Inside torchrun (RANK/WORLD_SIZE set) each rank trains and rank 0 prints the report. Outside it, the plan is
checked against the model, the machine and the cluster (runtime/preflight.py), saved, and handed to torchrun's
own launcher (`elastic_launch`, what the `torchrun` command runs) for `meshplan.cli execute` on
`world_size` ranks; the report comes back through a JSON file. The launcher runs in this process so that a
failed job ends in one RunFailedError naming each failed rank and its exit status, not torchrun's traceback.

Failures: `max_restarts` lets torchrun restart the whole rank group after a rank dies; a restarted group
(TORCHELASTIC_RESTART_COUNT > 0) resumes from the latest complete checkpoint when a checkpoint directory is
set, so at most `checkpoint_every` steps are redone. `timeout_s` bounds how long a rank may make no progress
(runtime/watchdog.py); the process group's own timeout is twice that, as a backstop.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import sys
import tempfile
import uuid
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import elastic_launch
from torch.distributed.run import config_from_args, get_args_parser

from costmodel.rank_environment import rank_import_environment
from planner.plan import Plan
from planner.plan_schema import PlanError
from runtime.checkpointing import CheckpointOptions, latest_checkpoint, resume_step
from runtime.preflight import (
    ACCEPT_MODEL_CHANGE_ENV,
    check_before_launch,
    check_in_rank,
    check_plan_matches_model,
    import_checked_model,
)
from runtime.report import RunReport
from runtime.train import check_runtime_supports, run_rank
from runtime.watchdog import HANG_EXIT_STATUS, Watchdog

DEFAULT_TIMEOUT_S = 600.0
"""Longest a rank may stay in one phase of a step (or in setup) before the watchdog ends the job."""
MAX_TIMEOUT_S = 7 * 24 * 3600.0
"""Largest timeout accepted (a week): beyond it the process group's timedelta and the watchdog lose meaning."""
CHECKED_FINGERPRINT_ENV = "MESHPLAN_CHECKED_FINGERPRINT"
"""Set by `execute` for its ranks: the plan fingerprint it already compared with the model (ranks skip the trace)."""


class RunFailedError(RuntimeError):
    """The training job failed after it started (a rank died, hung or raised); the message names each rank."""


def inside_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def check_run_options(steps: int, max_restarts: int, timeout_s: float) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PlanError(f"steps must be a positive integer, got {steps!r}")
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
        raise PlanError(f"max_restarts must be an integer >= 0, got {max_restarts!r}")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not math.isfinite(timeout_s) \
            or timeout_s <= 0:
        raise PlanError(f"timeout_s must be a number of seconds > 0, got {timeout_s!r}")
    if timeout_s > MAX_TIMEOUT_S:
        raise PlanError(f"--timeout-s {timeout_s:g} is more than the {MAX_TIMEOUT_S:g} s (a week) meshplan accepts; "
                        "give a timeout a hung rank should not outlast, e.g. 600")


def check_output_file(option: str, path: str | os.PathLike) -> None:
    """Refuse, before any rank starts, an output file whose folder is missing or not writable (or that is a
    folder): otherwise the run fails only after training."""
    path = Path(path)
    if path.is_dir():
        raise PlanError(f"{option} {path} is a folder; give a file path such as {path / 'report.json'}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise PlanError(f"{option} {path}: the folder {folder} does not exist (or is not a folder); create it "
                        "first or give a path in an existing folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PlanError(f"{option} {path}: the folder {folder} is not writable by this user; give a path you can "
                        "write to")


def checkpoint_for_this_attempt(checkpoint: CheckpointOptions | None) -> CheckpointOptions | None:
    """After torchrun restarted the rank group (TORCHELASTIC_RESTART_COUNT > 0), resume from the latest complete
    checkpoint if there is one (none yet: start again from step 0)."""
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if checkpoint is None or checkpoint.resume or restarts == 0 or latest_checkpoint(checkpoint.directory) is None:
        return checkpoint
    print(f"meshplan: rank {os.environ.get('RANK')}: restart {restarts}: resuming from "
          f"{latest_checkpoint(checkpoint.directory)}", file=sys.stderr, flush=True)
    return dataclasses.replace(checkpoint, resume=True)


def store_for_this_attempt(timeout: timedelta) -> dist.Store | None:
    """The rendezvous store under a per-attempt prefix, for a restarted group that shares torchrun's agent store.

    torchrun (torch 2.13, c10d rendezvous) keeps one agent TCPStore for all restarts and hands it to the ranks
    without a per-attempt prefix (TORCHELASTIC_USE_AGENT_STORE), so a restarted gloo group reads the dead
    attempt's addresses and fails with "connectFullMesh ... Connection refused" (pytorch/pytorch#135712).
    `execute` avoids that by launching with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store per attempt);
    this covers a group that someone started with `torchrun --max-restarts` by hand. None: the default store
    is fine."""
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restarts == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                timeout=timeout)
    return dist.PrefixStore(f"meshplan/attempt_{restarts}", agent_store)


def run_in_this_process_group(plan: Plan, steps: int, plan_dir: Path | None,
                              checkpoint: CheckpointOptions | None = None, watch: Watchdog | None = None) -> RunReport:
    """Train on this rank and gather every rank's result into one report (returned on every rank)."""
    result = run_rank(plan, steps, plan_dir, checkpoint, watch)
    if watch is not None:
        watch.enter(steps, "report")
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    return RunReport.from_ranks(plan, steps, gathered)


def run_plan_in_torchrun(plan: Plan, steps: int, plan_dir: Path | None, report_path=None,
                         quiet: bool = False, checkpoint: CheckpointOptions | None = None,
                         timeout_s: float = DEFAULT_TIMEOUT_S) -> RunReport:
    """This rank's part of a torchrun job: check the launch, init the process group, train under the watchdog,
    gather; rank 0 prints and saves the report."""
    check_in_rank(plan)
    import_checked_model(plan, plan_dir)  # before any of the model file's code runs in this rank
    if os.environ.get(CHECKED_FINGERPRINT_ENV) != plan.model.fingerprint:  # started by torchrun, not `execute`
        check_plan_matches_model(plan, plan_dir)
    checkpoint = checkpoint_for_this_attempt(checkpoint)
    backend = "nccl" if plan.cluster.get("backend") == "nccl" else "gloo"
    owns_group = not dist.is_initialized()
    if owns_group:
        timeout = timedelta(seconds=2 * timeout_s)
        store = store_for_this_attempt(timeout)
        if store is None:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    try:
        with Watchdog(timeout_s) as watch:
            report = run_in_this_process_group(plan, steps, plan_dir, checkpoint, watch)
            gc.collect()  # free sharded models (FSDP2/DDP keep reference cycles) while their process groups live;
            # otherwise gloo work objects can die in interpreter teardown (SIGABRT, pytorch/pytorch#179291)
            dist.barrier()  # no rank tears gloo down while a peer still talks to it
    finally:
        if owns_group:
            dist.destroy_process_group()
    if int(os.environ["RANK"]) == 0:
        report.plan_dir = str(plan_dir or Path.cwd())
        recost_on_measured_machine(report, plan, plan_dir)
        if report_path:
            report.save(report_path)
        if not quiet:
            print(report.format(), flush=True)
    return report


def recost_on_measured_machine(report: RunReport, plan: Plan, plan_dir: Path | None) -> None:
    """Price the plan again on the machine profiles rank 0 measured in the run (CPU runs, runtime/train.py
    `measure_machine`: before and after the timed steps; the geometric mean of the two predictions) and put
    that prediction beside the plan's in the report. The same pricer as `meshplan
    validate` (planner/recost.py); it traces the model on the meta device once more (a few seconds)."""
    profiles = [p for p in (report.ranks[0].machine_profile_before, report.ranks[0].machine_profile)
                if p is not None] if report.ranks else []
    if not profiles:
        return
    from costmodel import Cluster
    from planner.model_graph import build_model_graph
    from planner.model_spec import load_model_spec
    from planner.recost import recost_plan

    try:
        spec = load_model_spec(plan.model.source, base_dir=plan_dir, device="meta")
        graph = build_model_graph(spec)
        predictions = [recost_plan(plan, spec.model, graph, Cluster.from_dict(
            profile, source="measured machine").for_world_size(plan.world_size)).prediction for profile in profiles]
    except (PlanError, ValueError) as err:  # ClusterError is a ValueError
        report.machine_note = str(err).splitlines()[0][:200]
        return

    def geometric_mean(values: list[float]) -> float:
        return math.exp(sum(math.log(max(v, 1e-12)) for v in values) / len(values))

    report.machine_step_time_ms = geometric_mean([p.step_time_ms for p in predictions])
    report.machine_breakdown_ms = {
        name: geometric_mean([getattr(p, field) or 0.0 for p in predictions]) for name, field in (
            ("compute", "compute_ms"), ("recompute", "recompute_ms"), ("communication", "communication_ms"),
            ("offload", "offload_ms"), ("optimizer", "optimizer_ms"), ("bubble", "bubble_ms"))}


@contextmanager
def _environment(**values: str):
    """Set environment variables for the ranks the launcher starts (they inherit this process's), then restore."""
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def describe_failure(err: ChildFailedError, max_restarts: int) -> str:
    """One line per failed rank: its exit status or signal, and what a hang exit means."""
    lines = [f"the training job failed ({max_restarts} restart(s) allowed, all used):"]
    for rank, failure in sorted(err.failures.items()):
        if failure.exitcode < 0:
            how = f"was killed by signal {failure.signal_name()}"
        elif failure.exitcode == HANG_EXIT_STATUS:
            how = f"exited with status {failure.exitcode}: its watchdog detected a hang (message above)"
        else:
            how = f"exited with status {failure.exitcode}"
        lines.append(f"  rank {rank} {how}")
    lines.append("See the ranks' output above.")
    return "\n".join(lines)


def launch(plan_file: Path, world_size: int, rank_args: list[str], max_restarts: int, env: dict[str, str]) -> None:
    """Run `python -m meshplan.cli execute PLAN ARGS` on `world_size` local ranks with torchrun's launcher, as
    `torchrun --standalone --nproc-per-node=N --max-restarts=R` does (with rank_import_environment)."""
    args = get_args_parser().parse_args([
        "--nnodes=1", f"--nproc-per-node={world_size}", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0",
        f"--rdzv-id={uuid.uuid4()}", f"--max-restarts={max_restarts}", "--module", "meshplan.cli", "execute",
        str(plan_file), *rank_args])
    env = {**env, **rank_import_environment()}
    if max_restarts > 0:  # a fresh rendezvous store per attempt (see store_for_this_attempt)
        env = {**env, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    if "OMP_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in env:
        # torchrun sets 1 and prints a banner saying so when this is unset; give each local rank its share of the
        # cores instead (what torchrun's banner recommends tuning), so the banner does not print
        env = {**env, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world_size))}
    with _environment(**env):
        config, command, command_args = config_from_args(args)
        try:
            elastic_launch(config=config, entrypoint=command)(*command_args)
        except ChildFailedError as err:
            raise RunFailedError(describe_failure(err, max_restarts)) from err


def execute(plan: Plan | str | os.PathLike, steps: int = 5, report_path: str | os.PathLike | None = None,
            quiet: bool = False, checkpoint_dir: str | os.PathLike | None = None,
            checkpoint_every: int | None = None, resume: bool = False, max_restarts: int = 0,
            timeout_s: float = DEFAULT_TIMEOUT_S, cluster=None, accept_model_change: bool = False) -> RunReport:
    """Run training steps 0 .. `steps` - 1 of `plan` (a Plan or a plan YAML path) and return the RunReport.

    With `checkpoint_dir`, model and optimizer state are saved there with torch.distributed.checkpoint every
    `checkpoint_every` steps and after the last; `resume` starts from the latest checkpoint there (any mesh).
    `max_restarts`: how often torchrun may restart the ranks after one fails (they resume from the latest
    checkpoint). `timeout_s`: a rank stuck that long in one phase ends the job with a message naming the rank
    and step. `cluster` (preset name, YAML path or Cluster): refuse a plan made for another cluster.
    `accept_model_change`: import the MODEL file even though its sha256 differs from the plan's record.
    Problems found before launch raise PlanError; a job that fails after launch raises RunFailedError.
    """
    check_run_options(steps, max_restarts, timeout_s)
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
        return run_plan_in_torchrun(plan, steps, plan_dir, report_path, quiet, checkpoint, timeout_s)

    if report_path is not None:
        check_output_file("--report-json", report_path)
    check_runtime_supports(plan)
    if checkpoint is not None and checkpoint.resume:
        resume_step(checkpoint.directory, plan, steps)
    check_before_launch(plan, plan_dir, cluster, accept_model_change)
    with tempfile.TemporaryDirectory(prefix="meshplan-") as tmp:
        report_file = Path(report_path) if report_path else Path(tmp) / "report.json"
        if plan_dir is None:
            plan_dir = Path.cwd()
        plan_file = Path(tmp) / "plan.yaml"
        plan.save(plan_file)
        rank_args = ["--steps", str(steps), "--report-json", str(Path(report_file).resolve()),
                     "--timeout-s", repr(float(timeout_s))]
        if quiet:
            rank_args.append("--quiet")
        if checkpoint is not None:
            rank_args += checkpoint.cli_args()
        env = {"MESHPLAN_PLAN_DIR": str(plan_dir), CHECKED_FINGERPRINT_ENV: plan.model.fingerprint}
        if accept_model_change:
            env[ACCEPT_MODEL_CHANGE_ENV] = "1"
        launch(plan_file, plan.world_size, rank_args, max_restarts, env)
        return RunReport.from_json(report_file.read_text())
