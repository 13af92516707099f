"""Cost-model fidelity: predicted vs measured step time and peak memory of several plans on CPU/gloo.

    PYTHONPATH=$PWD python benchmarks/costmodel_fidelity.py [--steps 6] [--fit-out fitted.yaml]

Every plan is of examples/gpt.py on 4 ranks (4 gloo processes; on the development machine they share 2
cores). Each run measures its machine inside the run (`execute` on a CPU plan: runtime/train.py
`measure_machine`), so a plan is predicted on the machine as it was while it ran, which on a shared host
changes from minute to minute. The step terms the in-run measurement does not see (costmodel StepScale) are
fitted with `meshplan calibrate --from-runs --on-measured-machine` (meshplan/tune.py) on the FIT runs, and
the SCORED runs, other plans run afterwards, are predicted with that fit: no scored run is in the fit.

FIT:    dp4, tp4, dp4 + full checkpointing, dp2 x tp2 + full checkpointing
SCORED: dp2 x tp2, dp2 x tp2 + selective checkpointing, dp4 + selective checkpointing, the planner's own
        plan (the README quick start: pp2 x dp2 interleaved 1F1B, zero2, 2 micro-batches)

pp = 1 rows are the configuration named (ZeRO-3, one micro-batch, float32; per layer the fastest option with
the row's checkpointing, no offload, tensor parallel wherever a layer supports it when tp > 1), priced with
the planner's own pricer and written as a plan. Prints per plan: predicted and measured step time and peak
memory with the relative error, then the median and max absolute errors of the scored runs.
Aims: step time median <= 10 %, max <= 25 % over the scored runs; peak memory <= 10 %.
`--fit-out` writes the fitted profile (its step_scale is what costmodel/fitted/cpu_in_run.yaml ships).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from costmodel import load_cluster
from meshplan import execute
from meshplan.tune import Pricer, free_terms, load_run, theta_of, tune_from_runs
from planner.api import plan, plan_from_search
from planner.config_space import ParallelConfig
from planner.evaluate_config import ConfigPricer
from planner.model_graph import build_model_graph
from planner.model_spec import load_model_spec
from planner.plan_schema import PlanError
from planner.search import SearchResult

ROOT = Path(__file__).resolve().parents[1]
GPT = f"{ROOT}/examples/gpt.py:build_gpt"
WORLD = 4

# name, (pp, dp, tp) or None for the planner's own plan, checkpoint mode of the blocks
FIT = [
    ("dp4", (1, 4, 1), "none"),
    ("tp4", (1, 1, 4), "none"),
    ("dp4 +ckpt full", (1, 4, 1), "full"),
    ("dp2xtp2 +ckpt full", (1, 2, 2), "full"),
]
SCORED = [
    ("dp2xtp2", (1, 2, 2), "none"),
    ("dp2xtp2 +ckpt selective", (1, 2, 2), "selective"),
    ("dp4 +ckpt selective", (1, 4, 1), "selective"),
    ("planner's plan (quick start)", None, "none"),
]


def runnable_plan(mesh: tuple[int, int, int] | None, checkpoint: str):
    """The plan for `mesh` (see the module docstring), priced by the planner on the `cpu` preset."""
    if mesh is None:
        return plan(GPT, "cpu", WORLD)
    spec = load_model_spec(GPT, device="meta")
    graph = build_model_graph(spec)
    cluster = load_cluster("cpu").for_world_size(WORLD)
    pricer = ConfigPricer(spec.model, graph, cluster)
    pp, dp, tp = mesh
    config = ParallelConfig(pp=pp, dp=dp, tp=tp, num_microbatches=1, schedule="none", virtual_stages=1,
                            dp_kind="zero3", replicate=1, param_dtype="float32",
                            global_batch_size=spec.global_batch_size)
    choice = []
    for index, layer in enumerate(graph.layers):
        wanted = checkpoint if layer.path.startswith("blocks.") else "none"
        options = [p for p in pricer.priced_options(index, config)
                   if not p.option.offload_activations and p.option.checkpoint in (wanted, "none")]
        exact = [p for p in options if p.option.checkpoint == wanted] or options
        # with tp > 1, shard every layer that can be (the plan the row's name describes, so the tensor-parallel
        # costs are exercised even where replicating would be predicted faster)
        sharded = [p for p in exact if p.option.strategy == "tensor"] if tp > 1 else []
        choice.append(min(sharded or exact, key=lambda p: p.unit_time_s))
    result = pricer.predict(config, [0], choice)
    found = SearchResult(best=result, alternatives=[], configs_total=1, configs_screened=1, configs_solved=1)
    return plan_from_search(GPT, graph, cluster, WORLD, spec.global_batch_size, found)


def run_with_retry(p, steps: int, report: Path):
    """execute(p); one retry when torchrun itself fails (gloo on an oversubscribed host sometimes aborts)."""
    try:
        return execute(p, steps=steps, quiet=True, report_path=report)
    except RuntimeError:
        return execute(p, steps=steps, quiet=True, report_path=report)


def error(predicted: float, measured: float) -> float:
    return (predicted - measured) / measured


def run_set(rows, steps: int, tmp: Path, tag: str) -> list[tuple[str, Path, object]]:
    done = []
    for index, (name, mesh, checkpoint) in enumerate(rows):
        p = runnable_plan(mesh, checkpoint)
        report_path = tmp / f"{tag}-{index}.json"
        try:
            report = run_with_retry(p, steps, report_path)
        except (PlanError, RuntimeError) as err:
            print(f"{name}: failed: {str(err)[:200]}", flush=True)
            continue
        print(f"ran {tag} {name}: measured {report.measured_step_time_ms:.1f} ms", flush=True)
        done.append((name, report_path, report))
    return done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="training steps per plan (first is warm-up)")
    parser.add_argument("--fit-out", help="also write the fitted profile here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="meshplan-fidelity-") as tmp:
        fit_runs = run_set(FIT, args.steps, Path(tmp), "fit")
        scored_runs = run_set(SCORED, args.steps, Path(tmp), "scored")
        tuned, text = tune_from_runs([str(path) for _, path, _ in fit_runs], "cpu",
                                     args.fit_out or str(Path(tmp) / "fitted.yaml"), on_measured_machine=True,
                                     name="cpu-in-run")
        print("\nfit on the FIT runs (meshplan calibrate --from-runs --on-measured-machine):\n" + text)
        terms = free_terms(tuned)
        theta = theta_of(tuned, terms)
        loaded = [(name, load_run(str(path)), report) for name, path, report in scored_runs]
        pricer = Pricer([run for _, run, _ in loaded]) if loaded else None
        rows, time_errors, memory_errors = [], [], []
        for name, run, report in loaded:
            predicted = pricer.run_ms(run, tuned, terms, theta, on_measured_machine=True)
            t_err = error(predicted, report.measured_step_time_ms)
            m_err = error(report.predicted_peak_memory_mib, report.measured_peak_memory_mib)
            time_errors.append(abs(t_err))
            memory_errors.append(abs(m_err))
            rows.append(f"{name:<30}{predicted:>10.1f}{report.measured_step_time_ms:>10.1f}{t_err:>+8.0%}"
                        f"{report.predicted_step_time_ms:>10.1f}{report.predicted_peak_memory_mib:>10.2f}"
                        f"{report.measured_peak_memory_mib:>10.2f}{m_err:>+8.0%}")
        print(f"\nSCORED runs ({args.steps} steps per plan, examples/gpt.py, {WORLD} ranks), each predicted on the "
              "machine measured in its run with the step scale fitted on the FIT runs\n")
        print(f"{'plan':<30}{'time ms':>10}{'measured':>10}{'error':>8}{'on cpu':>10}{'mem MiB':>10}"
              f"{'measured':>10}{'error':>8}")
        print("\n".join(rows))
        if time_errors:
            print(f"\nstep time |error| median {statistics.median(time_errors):.0%}, max {max(time_errors):.0%} "
                  f"(aims <= 10%, <= 25%); peak memory |error| median {statistics.median(memory_errors):.0%}, "
                  f"max {max(memory_errors):.0%} (aim <= 10%) over {len(time_errors)} scored plans")
    return 0


if __name__ == "__main__":
    sys.exit(main())
