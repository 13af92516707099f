"""The `meshplan` command: plan, show, validate, diff, execute, calibrate.

    meshplan plan examples/gpt.py:build_gpt --cluster cpu --world-size 4 --out plan.yaml
    meshplan plan hf:config.json --seq-len 128 --global-batch 8 [--task causal-lm] --cluster h100 --world-size 64
    meshplan show plan.yaml [--why] [--timeline FILE.png] [--trace FILE.json]
    meshplan validate plan.yaml examples/gpt.py:build_gpt --cluster cpu
    meshplan diff a.yaml b.yaml
    meshplan export plan.yaml --to torchtitan|megatron|deepspeed [--out FILE]
    meshplan execute plan.yaml --steps 5 [--checkpoint-dir DIR [--checkpoint-every K] [--resume]]
                     [--max-restarts N] [--timeout-s S] [--cluster NAME_OR_YAML] [--profile DIR]
    meshplan calibrate --out cluster.yaml [--base PRESET] [--nproc-per-node N] [--quick]
    meshplan calibrate --from-runs R1.json R2.json ... --cluster base.yaml --out tuned.yaml

The error boundary (`main`): a failure meshplan can foresee (a bad plan, cluster, model, checkpoint or path,
a mismatched world size) prints one paragraph naming the input, the field or path and the fix, exit 2; a
training job that fails after it started (a rank died or hung) prints which ranks failed, exit 1; anything
else is a bug: one line naming it and the log file holding its traceback (or the traceback itself with
`--debug` or MESHPLAN_DEBUG=1), exit 1. A closed stdout (`meshplan show plan.yaml | head -1`) ends quietly.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import traceback
from pathlib import Path

from costmodel import ClusterError
from costmodel.progress import ENV as PROGRESS_ENV
from meshplan.show import format_plan
from planner.capture import CaptureError
from planner.model_spec import ModelSpecError
from planner.plan import Plan
from planner.plan_schema import PlanError

USER_ERRORS = (PlanError, ClusterError, ModelSpecError, CaptureError)
MAX_MESSAGE_CHARS = 4000
"""Longest error message printed; a longer one is cut (it quotes an input that should have been brief)."""
MAX_WORLD_SIZE = 2**20
"""Largest --world-size accepted (1,048,576 ranks); the planner's divisor search is O(sqrt n) below it."""
TIMELINE_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")
DEBUG_ENV = "MESHPLAN_DEBUG"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text[:40]!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _world_size(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_WORLD_SIZE:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_WORLD_SIZE:,} ranks, got {value:,}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _mesh(text: str) -> tuple[int, int, int]:
    """PPxDPxTP (or DPxTP, meaning pp = 1)."""
    try:
        sizes = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PPxDPxTP or DPxTP such as 1x2x2, got {text!r}") from None
    if len(sizes) not in (2, 3) or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected PPxDPxTP or DPxTP with positive sizes, got {text!r}")
    return sizes if len(sizes) == 3 else (1, *sizes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshplan", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help=f"print the traceback of an internal error instead "
                                                             f"of writing it to a log file (or {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="search the fastest plan that fits and write it as YAML")
    p.add_argument("model", help="path/to/file.py:function returning a meshplan.ModelSpec, or hf:PATH (a Hugging "
                                 "Face config.json or model folder, built from its config with random weights)")
    p.add_argument("--cluster", required=True, help="preset name (cpu, a100-80g) or a cluster YAML file")
    from planner.hf_source import TASKS

    p.add_argument("--task", choices=TASKS, help="hf: only: what to train (default: the config's architectures)")
    p.add_argument("--seq-len", type=_positive_int, help="hf: only: tokens per sample of the synthetic batch")
    p.add_argument("--global-batch", type=_positive_int, help="hf: only: samples per optimizer step (default 8)")
    p.add_argument("--world-size", type=_world_size, required=True, help="number of devices (ranks)")
    p.add_argument("--mesh", type=_mesh, help="pin the mesh as PPxDPxTP or DPxTP (e.g. 2x2) instead of searching")
    p.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype of parameters; not float32 means mixed precision with fp32 master weights")
    p.add_argument("--out", default="plan.yaml", help="where to write the plan (default plan.yaml)")
    p.add_argument("--progress", action="store_true", help="draw the search's progress bar on stderr even when it "
                                                           "is not a terminal (same as MESHPLAN_PROGRESS=1)")
    s = sub.add_parser("show", help="print a plan as tables")
    s.add_argument("plan")
    s.add_argument("--why", action="store_true", help="also list the alternatives the search priced and why "
                                                      "each lost")
    s.add_argument("--timeline", metavar="FILE.png", help="also draw the pipeline schedule (one row per pipeline "
                                                          "rank, predicted times) to this image")
    s.add_argument("--trace", metavar="FILE.json", help="also write the predicted schedule as a Chrome trace "
                                                        "(Perfetto, chrome://tracing)")
    v = sub.add_parser("validate", help="check a (hand-edited) plan against the model and cluster and price it "
                                        "again with the planner's cost model")
    v.add_argument("plan")
    v.add_argument("model", help="path/to/file.py:function returning a meshplan.ModelSpec")
    v.add_argument("--cluster", required=True, help="preset name or cluster YAML to check and price against")
    d = sub.add_parser("diff", help="what changed between two plans and the predicted effect")
    d.add_argument("plan_a")
    d.add_argument("plan_b")
    d.add_argument("--model", help="re-cost both plans for this MODEL (with --cluster) instead of comparing the "
                                   "predictions recorded in the files (stale in a hand-edited plan)")
    d.add_argument("--cluster", help="preset name or cluster YAML for --model")
    e = sub.add_parser("execute", help="train with a plan across ranks (starts torchrun when needed)")
    e.add_argument("plan")
    e.add_argument("--steps", type=_positive_int, default=5)
    e.add_argument("--report-json", help="also write the run report as JSON here")
    e.add_argument("--quiet", action="store_true", help="do not print the report")
    e.add_argument("--checkpoint-dir", help="save model and optimizer state here (torch.distributed.checkpoint) "
                                            "every --checkpoint-every steps and after the last")
    e.add_argument("--checkpoint-every", type=_positive_int, help="steps between checkpoints (default: only at "
                                                                  "the end)")
    e.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint-dir "
                                                         "(saved under any mesh); --steps is the total step count")
    e.add_argument("--max-restarts", type=_non_negative_int, default=0,
                   help="restart all ranks up to N times after one fails (torchrun --max-restarts); with "
                        "--checkpoint-dir they resume from the latest checkpoint (default 0)")
    e.add_argument("--timeout-s", type=_positive_seconds, default=None,
                   help="a rank that makes no progress for this long (a hang, a collective mismatch) ends the job "
                        "with a message naming the rank and step (default 600)")
    e.add_argument("--cluster", help="refuse the plan unless it was made for this cluster (preset or YAML)")
    e.add_argument("--accept-model-change", action="store_true",
                   help="import the MODEL file even though its sha256 differs from the one the plan recorded "
                        "(its traced graph must still match the plan)")
    e.add_argument("--profile", metavar="DIR", help="record the last step of every rank with torch.profiler as "
                                                    "DIR/rank{R}.json (Chrome trace)")
    from meshplan.export import add_arguments as add_export_arguments

    add_export_arguments(sub.add_parser("export", help="write the plan as a torchtitan, Megatron-LM or DeepSpeed "
                                                       "config (the nearest one it can say, re-costed)"))
    c = sub.add_parser("calibrate", help="measure this machine (compute, memory, collectives) and write a cluster "
                                         "YAML for --cluster (starts torchrun when needed)")
    from costmodel.calibrate import add_arguments

    add_arguments(c)
    c.add_argument("--from-runs", nargs="+", metavar="REPORT.json",
                   help="instead of measuring: fit the step-level terms of --cluster to these `execute --report-json` "
                        "runs (least squares; prints each run's error before and after, and leave-one-out)")
    c.add_argument("--cluster", help="with --from-runs: the profile the runs are re-costed on and --out starts from")
    c.add_argument("--on-measured-machine", action="store_true",
                   help="with --from-runs: re-cost each CPU run on the machine profile measured inside it")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.command == "plan":
        from planner.api import plan

        check_output_path("--out", args.out)
        if args.progress:
            os.environ[PROGRESS_ENV] = "1"
        from planner.hf_source import source_from_arguments

        model = source_from_arguments(args.model, args.task, args.seq_len, args.global_batch)
        result = plan(model, args.cluster, args.world_size, mesh=args.mesh, param_dtype=args.param_dtype)
        result.save(args.out)
        print(format_plan(result))
        print(f"\nwrote {args.out}")
        return 0
    if args.command == "show":
        if args.timeline:
            check_output_path("--timeline", args.timeline, TIMELINE_FORMATS)
        shown = Plan.load(args.plan)
        print(format_plan(shown, why=args.why))
        if args.timeline:
            from meshplan.timeline import draw_timeline

            draw_timeline(shown, args.timeline)
            print(f"\nwrote {args.timeline}" + ("" if shown.mesh.pp > 1 else " (pp = 1: no pipeline, one row)"))
        if args.trace:
            from meshplan.trace import write_predicted_trace

            write_predicted_trace(shown, args.trace)
            print(f"\nwrote {args.trace}")
        return 0
    if args.command == "validate":
        from meshplan.validate import check_fits, validate_plan

        text, checked, recosted = validate_plan(args.plan, args.model, args.cluster)
        print(text)
        check_fits(args.plan, checked, recosted)
        print(f"\n{args.plan} fits: peak {recosted.prediction.peak_memory_mib:,.3f} MiB of "
              f"{recosted.prediction.memory_limit_mib:,.1f} MiB per device")
        return 0
    if args.command == "diff":
        from meshplan.diff import format_diff

        a, b = Plan.load(args.plan_a), Plan.load(args.plan_b)
        if (args.model is None) != (args.cluster is None):
            raise PlanError("diff: give --model and --cluster together to re-cost both plans, or neither")
        if args.model is not None:
            from meshplan.validate import recost_file

            a.predicted = recost_file(a, args.model, args.cluster).prediction
            b.predicted = recost_file(b, args.model, args.cluster).prediction
        print(format_diff(a, b, args.plan_a, args.plan_b, recosted=args.model is not None))
        return 0
    if args.command == "execute":
        from runtime.execute import DEFAULT_TIMEOUT_S, execute, inside_torchrun, run_plan_in_torchrun

        timeout_s = DEFAULT_TIMEOUT_S if args.timeout_s is None else args.timeout_s
        if args.profile:  # read by each rank's train loop (runtime/profiling.py); torchrun passes it down
            from runtime.profiling import PROFILE_ENV

            os.environ[PROFILE_ENV] = str(Path(args.profile).resolve())
        checkpoint_kwargs = dict(checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                                 resume=args.resume)
        if inside_torchrun():
            from runtime.checkpointing import CheckpointOptions

            plan_dir = Path(os.environ.get("MESHPLAN_PLAN_DIR", Path(args.plan).resolve().parent))
            checkpoint = None if args.checkpoint_dir is None else \
                CheckpointOptions(args.checkpoint_dir, args.checkpoint_every, args.resume)
            run_plan_in_torchrun(Plan.load(args.plan), args.steps, plan_dir, args.report_json, args.quiet,
                                 checkpoint, timeout_s)
        else:
            execute(args.plan, steps=args.steps, report_path=args.report_json, quiet=args.quiet,
                    max_restarts=args.max_restarts, timeout_s=timeout_s, cluster=args.cluster,
                    accept_model_change=args.accept_model_change, **checkpoint_kwargs)
        return 0
    if args.command == "calibrate" and args.from_runs:
        from meshplan.tune import tune_from_runs

        base = args.cluster or args.base
        if base is None:
            raise PlanError("calibrate --from-runs: give --cluster NAME_OR_YAML, the profile the runs are re-costed "
                            "on (the one they were planned on, or a calibrated one)")
        name = None if args.name == "calibrated" else args.name
        _, text = tune_from_runs(args.from_runs, base, args.out, args.on_measured_machine, name)
        print(text)
        return 0
    if args.command == "export":
        from meshplan.export import run_export

        return run_export(args)
    if args.command == "calibrate":
        from costmodel.calibrate import calibrate

        if args.cluster is not None or args.on_measured_machine:
            raise PlanError("calibrate: --cluster and --on-measured-machine go with --from-runs (to measure this "
                            "machine starting from a profile, use --base)")
        check_output_path("--out", args.out)  # before minutes of measuring
        calibrate(args)
        return 0
    raise AssertionError(args.command)


def check_output_path(option: str, path: str, suffixes: tuple[str, ...] = ()) -> None:
    """Refuse an output path that cannot be written, before the work that produces it (planning, measuring)."""
    target = Path(path)
    if suffixes and target.suffix.lower() not in suffixes:
        raise PlanError(f"{option} {path}: the file name must end in one of {', '.join(suffixes)} (the image "
                        "format is taken from it)")
    if target.is_dir():
        raise PlanError(f"{option} {path} is a folder; give a file path inside it, e.g. {target / 'plan.yaml'}")
    folder = target.parent
    if not folder.is_dir():
        raise PlanError(f"{option} {path}: the folder {folder} does not exist (No such file or directory); "
                        "check the path, or create the folder first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PlanError(f"{option} {path}: the folder {folder} is not writable by this user; check the path")


def _bounded(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return f"{message[:MAX_MESSAGE_CHARS]}... ({len(message) - MAX_MESSAGE_CHARS:,} more characters left out)"


def _report_internal_error(command: str, err: BaseException) -> None:
    """One line on stderr naming the unforeseen error and the log file its traceback was written to."""
    text = "".join(traceback.format_exception(err))
    first = (str(err).splitlines() or [""])[0][:200]
    try:
        handle, log = tempfile.mkstemp(prefix=f"meshplan-{command}-", suffix=".log")
        with os.fdopen(handle, "w") as out:
            out.write(text)
        where = f"the traceback is in {log}"
    except OSError:
        where = "the traceback could not be written to a log file"
    print(f"meshplan {command}: internal error: {type(err).__name__}: {first} ({where}; rerun with --debug to "
          "print it, and please report it)", file=sys.stderr)


def _quiet_broken_pipe() -> int:
    """stdout was closed by its reader (`| head`): stop without a message, and keep Python's exit-time flush
    from failing on the same pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV) == "1"
    try:
        return run(args)
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except USER_ERRORS as err:
        print(_bounded(f"meshplan {args.command}: error: {err}"), file=sys.stderr)
        return 2
    except OSError as err:  # a file the user named cannot be read or written (missing folder, permissions)
        where = f": {err.filename}" if err.filename else ""
        print(_bounded(f"meshplan {args.command}: error: {err.strerror or err}{where}; check the path and that its "
                       "folder exists and is writable"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"meshplan {args.command}: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except BaseException as err:  # noqa: BLE001 -- the boundary: torch's CheckpointException is a BaseException
        from runtime.execute import RunFailedError

        if isinstance(err, RunFailedError):
            print(_bounded(f"meshplan {args.command}: error: {err}"), file=sys.stderr)
            return 1
        if debug:
            raise
        _report_internal_error(args.command, err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
