"""`meshplan calibrate --from-runs R1.json R2.json ... --cluster base.yaml --out tuned.yaml`: fit a profile to runs.

Every `meshplan execute --report-json R.json` records the plan that ran (its YAML), the model fingerprint, the
median measured step time of the slowest rank and, on CPU, the machine profile the ranks measured inside the
run. This module re-costs each run's plan with the planner's own pricer (planner/recost.py, the path `meshplan
validate` uses) and fits the profile's step-level free terms so that the predictions match the measurements:

    minimise  sum_i (log(predicted_i(theta) / measured_i))^2  +  ridge * |theta - theta_base|^2

theta: the log of each `step_scale` multiplier (compute, host_overhead, communication, optimizer: see
costmodel/cluster.py StepScale) and, on CUDA profiles, the overlap fractions (fsdp_all_gather,
gradient_reduction, pipeline_p2p, tensor_parallel, kept in [0, 1]). Levenberg-Marquardt on forward-difference
Jacobians; predicted_i is the real pricer each time (a re-cost takes tens of milliseconds). The log error
weighs a 2x miss the same on a 10 ms and a 10 s step. The ridge term (RIDGE) keeps terms the runs do not
constrain where the base has them: with fewer runs than terms the fit moves only what the runs can see.

Printed: every run's error on the base profile and after the fit, and the leave-one-out error (each run
predicted by a fit over the others). The written profile is the base with the fitted terms, its description
names the runs it was fitted on and its error, and a comment header lists every run.

Refused (PlanError, exit 2): files that are not execute reports, reports from before plans were recorded in
them, runs of different models (graph fingerprints) and runs planned for another cluster shape (device type,
backend, devices per node) than the base. `on_measured_machine=True` (`--on-measured-machine`) re-costs each
CPU run on the machine profile measured inside it instead of on the base: that fits what the in-run measurement
misses (costmodel/fitted/cpu_in_run.yaml was written that way).

Blind spots: the step scale multiplies whole terms, so an error that depends on op shape or message size
beyond what the formulas already model is averaged over the runs; runs measured under different load on a
shared host disagree, which the in-sample and leave-one-out errors show.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from costmodel import Cluster, OverlapSpec, StepScale, load_cluster
from costmodel.cluster import OVERLAP_KINDS, STEP_SCALE_KINDS
from planner.plan import Plan
from planner.plan_schema import PlanError

RIDGE = 0.01
"""Weight of the pull towards the base profile's terms, per term (log units for scales)."""
_LOG_BOUND = math.log(50.0)
"""Scales stay within [1/50, 50] of 1."""
_STEP = 1e-3
_ITERATIONS = 25


@dataclass
class Run:
    """One measured run: its plan, the measured step time and, for CPU runs, the machine measured in it."""

    path: str
    plan: Plan
    measured_ms: float
    machines: list[Cluster]
    """The machine profiles measured in the run (CPU runs: before and after the timed steps), else empty."""
    plan_dir: str

    @property
    def label(self) -> str:
        m = self.plan.mesh
        ckpt = sorted({layer.checkpoint for layer in self.plan.layers} - {"none"})
        return (f"pp{m.pp} dp{m.dp} tp{m.tp} {self.plan.data_parallel.kind} m={self.plan.pipeline.num_microbatches}"
                + (f" ckpt {'/'.join(ckpt)}" if ckpt else ""))


def load_run(path: str) -> Run:
    """Read one `execute --report-json` file; PlanError naming the file and the fix when it is not one."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise PlanError(f"{path}: cannot read the run report ({err.strerror or err}); check the path") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PlanError(f"{path}: not a run report (not JSON: {err}); pass files written by "
                        "`meshplan execute --report-json`") from err
    if not isinstance(data, dict) or "measured_step_time_ms" not in data or "ranks" not in data:
        raise PlanError(f"{path}: not a run report (no measured_step_time_ms / ranks); pass files written by "
                        "`meshplan execute --report-json`")
    if not data.get("plan_yaml"):
        raise PlanError(f"{path}: the report does not record the plan that ran (written by an older meshplan); "
                        "run `meshplan execute PLAN --report-json` again")
    plan = Plan.from_yaml(data["plan_yaml"], source=f"{path}: plan_yaml")
    measured = data["measured_step_time_ms"]
    if isinstance(measured, bool) or not isinstance(measured, (int, float)) or not math.isfinite(measured) \
            or measured <= 0:
        raise PlanError(f"{path}: measured_step_time_ms is {measured!r}; the run timed no step (use --steps >= 3)")
    machines = []
    ranks = data["ranks"] if isinstance(data["ranks"], list) else []
    for key in ("machine_profile_before", "machine_profile"):
        profile = ranks[0].get(key) if ranks and isinstance(ranks[0], dict) else None
        if profile is not None:
            machines.append(Cluster.from_dict(profile, source=f"{path}: ranks[0].{key}"))
    return Run(path, plan, float(measured), machines, str(data.get("plan_dir") or ""))


def check_runs(runs: list[Run], base: Cluster) -> None:
    """One model and the base's cluster shape in every run, else PlanError naming the odd runs and the fix."""
    fingerprints = {run.plan.model.fingerprint for run in runs}
    if len(fingerprints) > 1:
        listing = "; ".join(f"{run.path}: {run.plan.model.source} ({run.plan.model.fingerprint})" for run in runs)
        raise PlanError(f"the runs are of different models (graph fingerprints differ: {listing}); fit a profile "
                        "on runs of one model at a time")
    want = (base.device_type, base.backend, base.devices_per_node)
    for run in runs:
        c = run.plan.cluster
        shape = (c.get("device_type"), c.get("backend"), c.get("devices_per_node"))
        if shape != want:
            raise PlanError(f"{run.path} was planned for another cluster shape than {base.name!r}: device_type "
                            f"{shape[0]}, backend {shape[1]}, {shape[2]} devices per node, against {want[0]}, "
                            f"{want[1]}, {want[2]}; fit each cluster on its own runs (or pass the --cluster the "
                            "runs were planned on)")


class Pricer:
    """Re-costs each run's plan on a profile (one model trace for all runs)."""

    def __init__(self, runs: list[Run]):
        from planner.model_graph import build_model_graph

        first = runs[0]
        spec = _load_spec(first)
        self.model = spec.model
        self.graph = build_model_graph(spec)
        if self.graph.fingerprint != first.plan.model.fingerprint:
            raise PlanError(f"{first.path}: the model {first.plan.model.source} now traces to fingerprint "
                            f"{self.graph.fingerprint}, the run's plan says {first.plan.model.fingerprint}: the "
                            "model changed since the run; run it again")

    def step_ms(self, run: Run, cluster: Cluster) -> float:
        from planner.recost import recost_plan

        sized = cluster.for_world_size(run.plan.world_size)
        return recost_plan(run.plan, self.model, self.graph, sized).prediction.step_time_ms

    def run_ms(self, run: Run, base: Cluster, terms: list[str], theta: list[float], on_measured_machine: bool,
               ) -> float:
        """The run's plan priced with the fitted terms `theta` on the base, or on each machine measured in the
        run (geometric mean over them, as `execute` reports it)."""
        starts = run.machines if on_measured_machine and run.machines else [base]
        logs = [math.log(self.step_ms(run, with_theta(start, terms, theta))) for start in starts]
        return math.exp(sum(logs) / len(logs))


def _load_spec(run: Run):
    from planner.model_spec import load_model_spec

    source = run.plan.model.source
    tried = []
    for base_dir in (run.plan_dir, os.getcwd(), str(Path(run.path).resolve().parent)):
        if not base_dir or base_dir in tried:
            continue
        tried.append(base_dir)
        path = source.rsplit(":", 1)[0]
        if Path(path).is_absolute() or (Path(base_dir) / path).exists():
            return load_model_spec(source, base_dir=Path(base_dir), device="meta")
    raise PlanError(f"{run.path}: the model file of {source!r} was found in none of {tried}; run from the folder "
                    "the plan was made in")


# ----------------------------------------------------------------------------------------------------------
# The terms and the fit.


def free_terms(base: Cluster) -> list[str]:
    """Names of the fitted terms: the step scales, and on CUDA the overlap fractions."""
    return [f"step_scale.{k}" for k in STEP_SCALE_KINDS] + (
        [f"overlap.{k}" for k in OVERLAP_KINDS] if base.device_type == "cuda" else [])


def theta_of(cluster: Cluster, terms: list[str]) -> list[float]:
    values = []
    for term in terms:
        group, name = term.split(".")
        values.append(math.log(getattr(cluster.step_scale, name)) if group == "step_scale"
                      else getattr(cluster.overlap, name))
    return values


def with_theta(cluster: Cluster, terms: list[str], theta: list[float]) -> Cluster:
    scales = {k: getattr(cluster.step_scale, k) for k in STEP_SCALE_KINDS}
    overlap = {k: getattr(cluster.overlap, k) for k in OVERLAP_KINDS}
    for term, value in zip(terms, theta, strict=True):
        group, name = term.split(".")
        if group == "step_scale":
            scales[name] = math.exp(value)
        else:
            overlap[name] = value
    return dataclasses.replace(cluster, step_scale=StepScale(**scales), overlap=OverlapSpec(**overlap))


def _clamp(terms: list[str], theta: list[float]) -> list[float]:
    return [max(-_LOG_BOUND, min(_LOG_BOUND, v)) if t.startswith("step_scale") else max(0.0, min(1.0, v))
            for t, v in zip(terms, theta, strict=True)]


@dataclass
class Fit:
    theta: list[float]
    terms: list[str]
    errors: list[float]
    """Relative error (predicted - measured) / measured of each fitted run after the fit."""


def fit_terms(runs: list[Run], base: Cluster, pricer: Pricer, on_measured_machine: bool) -> Fit:
    """Levenberg-Marquardt on log errors with a ridge towards the base's terms (module docstring)."""
    terms = free_terms(base)
    theta0 = theta_of(base, terms)

    def residuals(theta: list[float]) -> list[float]:
        out = [math.log(pricer.run_ms(run, base, terms, theta, on_measured_machine) / run.measured_ms)
               for run in runs]
        return out + [math.sqrt(RIDGE) * (a - b) for a, b in zip(theta, theta0, strict=True)]

    theta = list(theta0)
    r = residuals(theta)
    cost = sum(v * v for v in r)
    damping = 1e-3
    for _ in range(_ITERATIONS):
        converged = False
        columns = []
        for k in range(len(terms)):
            shifted = list(theta)
            step = _STEP if terms[k].startswith("step_scale") or theta[k] + _STEP <= 1 else -_STEP
            shifted[k] += step
            columns.append([(a - b) / step for a, b in zip(residuals(shifted), r, strict=True)])
        jac = torch.tensor(columns, dtype=torch.float64).T
        res = torch.tensor(r, dtype=torch.float64)
        normal = jac.T @ jac
        gradient = jac.T @ res
        improved = False
        for _ in range(8):
            delta = torch.linalg.solve(normal + damping * torch.diag(torch.diag(normal) + 1e-9), -gradient)
            candidate = _clamp(terms, [a + float(d) for a, d in zip(theta, delta, strict=True)])
            r_new = residuals(candidate)
            cost_new = sum(v * v for v in r_new)
            if cost_new < cost:
                converged = cost - cost_new < 1e-10
                theta, r, cost, damping, improved = candidate, r_new, cost_new, damping / 3, True
                break
            damping *= 10
        if not improved or converged:
            break
    errors = [math.exp(v) - 1 for v in r[:len(runs)]]
    return Fit(theta, terms, errors)


def _mean_max(errors: list[float]) -> tuple[float, float]:
    absolute = [abs(e) for e in errors]
    return (statistics.mean(absolute), max(absolute)) if absolute else (float("nan"), float("nan"))


def tune_from_runs(paths: list[str], base_name: str, out: str, on_measured_machine: bool = False,
                   name: str | None = None) -> tuple[Cluster, str]:
    """Fit, write `out`, and return the tuned profile and the printed summary."""
    if not paths:
        raise PlanError("--from-runs needs at least one run report")
    base = load_cluster(base_name)
    runs = [load_run(path) for path in paths]
    check_runs(runs, base)
    if on_measured_machine and any(not run.machines for run in runs):
        missing = ", ".join(run.path for run in runs if not run.machines)
        raise PlanError(f"--on-measured-machine needs runs that measured their machine (CPU runs); {missing} did "
                        "not (GPU run, or MESHPLAN_MEASURE_MACHINE=0)")
    pricer = Pricer(runs)

    terms = free_terms(base)
    before = [pricer.run_ms(run, base, terms, theta_of(base, terms), on_measured_machine) for run in runs]
    fit = fit_terms(runs, base, pricer, on_measured_machine)
    tuned = with_theta(base, fit.terms, fit.theta)
    after = [pricer.run_ms(run, base, fit.terms, fit.theta, on_measured_machine) for run in runs]
    held_out: list[float | None] = []
    for i, run in enumerate(runs):
        others = runs[:i] + runs[i + 1:]
        if not others:
            held_out.append(None)
            continue
        loo = fit_terms(others, base, pricer, on_measured_machine)
        predicted = pricer.run_ms(run, base, loo.terms, loo.theta, on_measured_machine)
        held_out.append((predicted - run.measured_ms) / run.measured_ms)

    def err(predicted: float, run: Run) -> float:
        return (predicted - run.measured_ms) / run.measured_ms

    on = "the machine measured in each run" if on_measured_machine else f"{base.name!r}"
    lines = [f"fitted {', '.join(fit.terms)} over {len(runs)} run(s), each re-costed on {on}", "",
             f"{'run':<28}{'plan':<34}{'measured ms':>12}{'before ms':>11}{'error':>8}{'after ms':>10}{'error':>8}"
             f"{'held out':>10}"]
    for run, b, a, h in zip(runs, before, after, held_out, strict=True):
        loo_text = f"{h:>+10.0%}" if h is not None else f"{'-':>10}"
        lines.append(f"{Path(run.path).name[:27]:<28}{run.label[:33]:<34}{run.measured_ms:>12.1f}{b:>11.1f}"
                     f"{err(b, run):>+8.0%}{a:>10.1f}{err(a, run):>+8.0%}{loo_text}")
    before_mean, before_max = _mean_max([err(b, run) for b, run in zip(before, runs, strict=True)])
    after_mean, after_max = _mean_max([err(a, run) for a, run in zip(after, runs, strict=True)])
    loo_values = [h for h in held_out if h is not None]
    loo_mean, loo_max = _mean_max(loo_values)
    scale = tuned.step_scale
    fitted_text = ", ".join(f"{k} {getattr(scale, k):.3g}" for k in STEP_SCALE_KINDS)
    if base.device_type == "cuda":
        fitted_text += "; overlap " + ", ".join(f"{k} {getattr(tuned.overlap, k):.3g}" for k in OVERLAP_KINDS)
    summary = (f"|error| mean {before_mean:.1%} / max {before_max:.1%} before, {after_mean:.1%} / {after_max:.1%} "
               f"after; leave-one-out " + (f"{loo_mean:.1%} / {loo_max:.1%}" if loo_values else "n/a (one run)"))
    lines += ["", f"step_scale {fitted_text}", summary]
    runs_text = ", ".join(f"{Path(run.path).name} ({run.label}, {run.measured_ms:.1f} ms)" for run in runs)
    description = ((base.description + "; ") if base.description else "") + (
        f"step terms fitted by `meshplan calibrate --from-runs` on {len(runs)} run(s) re-costed on {on}: "
        f"{runs_text}; {summary}")
    tuned = dataclasses.replace(tuned, name=name or f"{base.name}-tuned", description=description)
    header = ["# meshplan cluster profile; units are in the key names (GB = 1e9 bytes, GiB = 2**30 bytes)",
              f"# step terms fitted by `meshplan calibrate --from-runs` from base {base_name} ({on}):"]
    header += [f"#   {line}" for line in lines]
    body = yaml.safe_dump(tuned.to_dict(), sort_keys=False, default_flow_style=None, allow_unicode=True)
    Path(out).write_text("\n".join(header) + "\n" + body, encoding="utf-8")
    lines.append(f"wrote {out}")
    return tuned, "\n".join(lines)
