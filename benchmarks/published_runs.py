"""meshplan's cost model against published large-scale training runs (issue 13).

    python benchmarks/published_runs.py [--rows NAME_SUBSTRING] [--no-search] [--fit] [--cluster a100-80g]

For each row of benchmarks/data/published_runs.yaml (every row cites its paper) this builds a plain GPT of the
row's shape on the meta device, writes the published configuration as a plan (pinned mesh, micro-batch,
schedule, virtual stages, recompute, data-parallel kind, fp16 mixed precision, layers split evenly over the
pipeline stages as Megatron-LM does), prices it with the planner's own pricer (`planner.recost.recost_plan`,
the path behind `meshplan validate`) and prints the published iteration time, the prediction, the signed
error and the predicted peak memory against the device. Then it lets the planner choose for the same model,
batch and GPUs and prints its choice, predicted time and claimed speed-up over the published layout; where
that claim exceeds 1.3x it prints the breakdown terms that make the difference.

Summary: mean and max |error|, and per GPU count of Table 2 the PTD-P / ZeRO-3 throughput ratio, predicted
beside published. The cluster is the `a100-80g` preset sized to each row (Selene: 8 GPUs a node).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from gpt import build_gpt  # noqa: E402

from costmodel import Cluster, load_cluster  # noqa: E402
from planner.api import plan_from_search  # noqa: E402
from planner.config_space import ParallelConfig  # noqa: E402
from planner.evaluate_config import ConfigPricer, ConfigResult  # noqa: E402
from planner.layer_options import LayerOption  # noqa: E402
from planner.model_graph import ModelGraph, build_model_graph  # noqa: E402
from planner.plan_schema import PlanError  # noqa: E402
from planner.recost import recost_plan  # noqa: E402
from planner.search import SearchResult, search_plans  # noqa: E402

DATA = ROOT / "benchmarks" / "data" / "published_runs.yaml"
PARAM_DTYPE = "float16"
CLAIM_TO_EXPLAIN = 1.3
BREAKDOWN_TERMS = ("compute_s", "recompute_s", "communication_s", "bubble_s", "optimizer_s", "offload_s")


def load_data(path: Path = DATA) -> tuple[list[dict], dict[str, dict]]:
    """(rows, systems) of the published-runs file."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    return data["rows"], data["systems"]


def system_cluster(base: Cluster, system: dict, gpus: int) -> Cluster:
    """The profile sized to the row, with the published system's overlap of gradient reduction (a property of
    its runtime: Megatron's local DDP reduces after backward) where it differs from the preset's."""
    cluster = base.for_world_size(gpus)
    if system["gradient_reduction_overlap"] != "preset":
        overlap = dataclasses.replace(cluster.overlap, gradient_reduction=system["gradient_reduction_overlap"])
        cluster = dataclasses.replace(cluster, overlap=overlap)
    return cluster


@dataclass
class Traced:
    spec: object
    graph: ModelGraph


_TRACED: dict[tuple, Traced] = {}


def traced_gpt(row: dict) -> Traced:
    """The row's GPT on the meta device and its captured graph (one trace per model shape)."""
    key = (row["layers"], row["hidden"], row["heads"], row["seq"], row["vocab"], row["global_batch"])
    if key not in _TRACED:
        with torch.device("meta"):
            spec = build_gpt(vocab=row["vocab"], seq_len=row["seq"], hidden=row["hidden"], num_heads=row["heads"],
                             num_layers=row["layers"], global_batch_size=row["global_batch"])
        _TRACED[key] = Traced(spec, build_model_graph(spec, sample_batch_size=1))
    return _TRACED[key]


def published_config(row: dict, system: dict) -> ParallelConfig:
    pp, dp, v = row["pp"], row["dp"], row["virtual_stages"]
    schedule = "none" if pp == 1 else ("interleaved_1f1b" if v > 1 else "1f1b")
    return ParallelConfig(pp=pp, dp=dp, tp=row["tp"], num_microbatches=row["global_batch"] // (dp * row["micro_batch"]),
                          schedule=schedule, virtual_stages=v, dp_kind=row["data_parallel"], replicate=1,
                          param_dtype=PARAM_DTYPE, global_batch_size=row["global_batch"],
                          reduce_dtype=system["reduce_dtype"])


def published_stage_starts(graph: ModelGraph, num_stages: int) -> list[int]:
    """Megatron-LM's cut: the transformer blocks dealt out evenly over the stages; the embeddings ride with the
    first stage, the final norm and head with the last."""
    blocks = [i for i, layer in enumerate(graph.layers) if layer.path.startswith("blocks.")]
    per_stage = len(blocks) // num_stages
    return [0] + [blocks[0] + s * per_stage for s in range(1, num_stages)]


def published_option(row: dict, layer, offered: list[LayerOption]) -> tuple[LayerOption, str]:
    """The option of `layer` the published run used, or the nearest one offered (and what differs)."""
    tp = row["tp"]
    checkpoint = row["recompute"] if layer.path.startswith("blocks.") else "none"
    if layer.path.startswith("blocks."):
        wanted = [LayerOption("tensor" if tp > 1 else "replicate", checkpoint,
                              sequence_parallel=bool(row["sequence_parallel"]))]
    elif layer.path in ("wte", "head"):  # Megatron's vocab-parallel embedding and head (with a parallel loss)
        wanted = [LayerOption("vocab")] if tp > 1 else []
    else:
        wanted = []
    wanted.append(LayerOption("replicate", checkpoint))
    for option in wanted:
        if option in offered:
            differs = f"{layer.path}: {wanted[0].label} not offered, priced as {option.label}"
            return option, "" if option == wanted[0] else differs
    raise SystemExit(f"{row['name']}: {layer.path} offers none of {[o.label for o in wanted]}")


def price_published(row: dict, system: dict, traced: Traced, cluster: Cluster,
                    write_plan: bool = True) -> tuple[ConfigResult, list[str], str]:
    """(priced result, what could not be written as published, plan refusal or '')."""
    config = published_config(row, system)
    pricer = ConfigPricer(traced.spec.model, traced.graph, cluster)
    starts = published_stage_starts(traced.graph, config.num_stages)
    differences = []
    choice = []
    for i, layer in enumerate(traced.graph.layers):
        priced = pricer.priced_options(i, config)
        option, differs = published_option(row, layer, [p.option for p in priced])
        if differs:
            differences.append(differs)
        choice.append(next(p for p in priced if p.option == option))
    result = pricer.predict(config, starts, choice)
    if not write_plan:
        return result, differences, ""
    # the same choice written as a plan, validated and re-costed as `meshplan validate` would
    plan = plan_from_search("benchmarks/published_runs.py", traced.graph, cluster, row["gpus"], row["global_batch"],
                            SearchResult(result, [], 1, 1, 1))
    refusal = ""
    try:
        plan.validate("plan")
        recosted = recost_plan(plan, traced.spec.model, traced.graph, cluster)
        assert abs(recosted.result.step_time_s - result.step_time_s) <= 1e-9 * result.step_time_s
    except PlanError as err:
        refusal = str(err)
    return result, differences, refusal


def predicted_step_s(result: ConfigResult) -> float:
    """The step time of a priced layout, also when it does not fit (then the sum of its parts)."""
    if result.feasible:
        return result.step_time_s
    return sum(result.breakdown_s[k] for k in BREAKDOWN_TERMS if k != "recompute_s")


def with_data_parallel_overlap(base: Cluster, fraction: float) -> Cluster:
    overlap = dataclasses.replace(base.overlap, fsdp_all_gather=fraction, gradient_reduction=fraction)
    return dataclasses.replace(base, overlap=overlap)


def fit_data_parallel_overlap(rows: list[dict], systems: dict[str, dict], base: Cluster) -> None:
    """Fit the profile's one free time constant, the share of data-parallel communication that hides behind
    compute (overlap.fsdp_all_gather = overlap.gradient_reduction), over the rows by least squares of the log
    error on a 0.05 grid; print it with its in-sample and leave-one-out errors."""
    grid = [round(0.05 * i, 2) for i in range(21)]
    log_error = {}  # (row name, fraction) -> log(predicted / published)
    for fraction in grid:
        cluster = with_data_parallel_overlap(base, fraction)
        for row in rows:
            system = systems[row["system"]]
            result, _, _ = price_published(row, system, traced_gpt(row), system_cluster(cluster, system, row["gpus"]),
                                           write_plan=False)
            log_error[row["name"], fraction] = math.log(predicted_step_s(result) / row["iteration_s"])

    def best(names: list[str]) -> float:
        return min(grid, key=lambda f: (sum(log_error[n, f] ** 2 for n in names), f))

    names = [r["name"] for r in rows]
    fitted = best(names)
    in_sample = [abs(math.expm1(log_error[n, fitted])) for n in names]
    held_out = [abs(math.expm1(log_error[n, best([m for m in names if m != n])])) for n in names]
    print(f"fitted data-parallel overlap fraction: {fitted} (preset {base.overlap.fsdp_all_gather}); |error| in "
          f"sample mean {statistics.mean(in_sample):.1%} max {max(in_sample):.1%}; leave-one-out mean "
          f"{statistics.mean(held_out):.1%} max {max(held_out):.1%} over {len(names)} rows")


def explain(chosen: ConfigResult, published: ConfigResult) -> str:
    parts = []
    for term in BREAKDOWN_TERMS:
        delta = published.breakdown_s.get(term, 0.0) - chosen.breakdown_s.get(term, 0.0)
        if abs(delta) > 0.02 * published.step_time_s:
            parts.append(f"{term.removesuffix('_s')} {delta:+.2f} s")
    return ", ".join(parts) or "no single term above 2% of the step"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="", help="only rows whose name contains this")
    parser.add_argument("--no-search", action="store_true", help="skip the planner's own choice")
    parser.add_argument("--cluster", default="a100-80g", help="preset or YAML profile (default a100-80g)")
    parser.add_argument("--fit", action="store_true",
                        help="also fit the data-parallel overlap fraction over the rows (with leave-one-out)")
    args = parser.parse_args()
    rows, systems = load_data()
    rows = [r for r in rows if args.rows in r["name"]]
    base = load_cluster(args.cluster)
    if args.fit:
        fit_data_parallel_overlap(rows, systems, base)
    errors: dict[str, float] = {}
    predicted_s: dict[str, float] = {}
    print(f"{'row':<32}{'layout':<28}{'published s':>12}{'predicted s':>12}{'error':>8}{'memory GiB':>16}")
    for row in rows:
        traced = traced_gpt(row)
        cluster = system_cluster(base, systems[row["system"]], row["gpus"])
        result, differences, refusal = price_published(row, systems[row["system"]], traced, cluster)
        step_s = predicted_step_s(result)
        error = step_s / row["iteration_s"] - 1
        errors[row["name"]], predicted_s[row["name"]] = error, step_s
        layout = f"pp{row['pp']} dp{row['dp']} tp{row['tp']} {row['data_parallel']} m{result.config.num_microbatches}" \
            + (f" v{row['virtual_stages']}" if row["virtual_stages"] > 1 else "")
        memory = f"{result.peak_memory_bytes / 2**30:.1f}/{cluster.usable_memory_bytes / 2**30:.0f}" \
            + ("" if result.feasible else " OOM")
        print(f"{row['name']:<32}{layout:<28}{row['iteration_s']:>12.2f}{step_s:>12.2f}{error:>+8.1%}{memory:>16}",
              flush=True)
        b = result.breakdown_s
        print("    " + ", ".join(f"{k.removesuffix('_s')} {b.get(k, 0.0):.2f}" for k in BREAKDOWN_TERMS))
        for note in differences:
            print(f"    written differently: {note}")
        if refusal:
            print(f"    the plan is refused: {refusal}")
        if not args.no_search:
            start = time.perf_counter()
            try:
                found = search_plans(traced.spec.model, traced.graph, cluster, row["gpus"], row["global_batch"],
                                     PARAM_DTYPE)
            except PlanError as err:
                print(f"    planner: {err}")
                continue
            best = found.best
            speedup = step_s / best.step_time_s
            print(f"    planner's choice: {best.config.summary}: {best.step_time_s:.2f} s, {speedup:.2f}x the "
                  f"published layout ({time.perf_counter() - start:.1f} s to plan)")
            if speedup > CLAIM_TO_EXPLAIN:
                print(f"    where the claimed speed-up comes from (published minus chosen): {explain(best, result)}")
    if not errors:
        return
    magnitudes = [abs(e) for e in errors.values()]
    print(f"\nmean |error| {statistics.mean(magnitudes):.1%}, max |error| {max(magnitudes):.1%} "
          f"over {len(errors)} rows")
    ratios = []
    for gpus in sorted({r["gpus"] for r in rows if "_t2_" in r["name"]}):
        z3 = next((r for r in rows if "_t2_z3_" in r["name"] and r["gpus"] == gpus), None)
        ptdp = next((r for r in rows if "_t2_ptdp_" in r["name"] and r["gpus"] == gpus), None)
        if z3 and ptdp:
            published = z3["iteration_s"] / ptdp["iteration_s"]
            predicted = predicted_s[z3["name"]] / predicted_s[ptdp["name"]]
            ratios.append(f"{gpus} GPUs: published {published:.2f}x, predicted {predicted:.2f}x "
                          f"({predicted / published - 1:+.0%})")
    if ratios:
        print("PTD-P / ZeRO-3 throughput, 175B: " + "; ".join(ratios))


if __name__ == "__main__":
    main()
