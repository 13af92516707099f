"""Is the planner's plan at least as fast as the best uniform configuration a grid search would find?

    python benchmarks/plan_quality.py

For each model and cluster size, under the same cost model:
- planner: meshplan's search (per-layer choices, pipeline cut by the partitioner, ILP per rank);
- grid: every configuration the planner may use (pp, dp, tp, micro-batches, schedule, ZeRO kind / HSDP /
  model-state offload) x one
  strategy for every layer (replicate or tensor) x one checkpointing for every layer (none / selective / full),
  layers split evenly over pipeline stages; the fastest that fits.
Prints both predicted step times and their ratio (planner / grid; aim: <= 1 everywhere, < 1 where per-layer
choices pay), and the planner's configuration.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from costmodel import load_cluster  # noqa: E402
from planner.config_space import enumerate_configs  # noqa: E402
from planner.evaluate_config import ConfigPricer, even_stage_starts  # noqa: E402
from planner.model_graph import build_model_graph  # noqa: E402
from planner.model_spec import load_model_spec  # noqa: E402
from planner.plan_schema import PlanError  # noqa: E402
from planner.search import search_plans  # noqa: E402

MODELS = ["gpt_1_3b", "gpt_6_7b", "gpt_13b", "llama_7b", "llama_70b", "gpt3_175b"]
WORLD_SIZES = [8, 64, 512]
CLUSTER = "a100-80g"
DTYPE = "bfloat16"


def best_uniform_s(pricer: ConfigPricer, configs) -> tuple[float, str]:
    best, label = math.inf, "nothing fits"
    n = len(pricer.layers)
    for config in configs:
        if config.num_stages > n:
            continue
        starts = even_stage_starts(n, config.num_stages)
        tables = [pricer.priced_options(i, config) for i in range(n)]
        for strategy in ("replicate", "tensor"):
            for checkpoint in ("none", "selective", "full"):
                choice = []
                for table in tables:
                    by = {(p.option.strategy, p.option.checkpoint): p for p in table
                          if not p.option.offload_activations}
                    pick = by.get((strategy, checkpoint)) or by.get(("replicate", checkpoint)) \
                        or by.get((strategy, "none")) or by[("replicate", "none")]
                    choice.append(pick)
                result = pricer.predict(config, starts, choice)
                if result.step_time_s < best:
                    best, label = result.step_time_s, f"{config.summary}, all {strategy}, ckpt {checkpoint}"
    return best, label


def main() -> None:
    print(f"{'model':<12}{'GPUs':>6}{'planner (s)':>13}{'grid (s)':>11}{'ratio':>8}{'grid configs':>14}"
          f"{'time (s)':>10}  planner's choice / best uniform")
    ratios = []
    for name in MODELS:
        spec = load_model_spec(f"{ROOT}/benchmarks/models.py:{name}", device="meta")
        graph = build_model_graph(spec)
        for world in WORLD_SIZES:
            cluster = load_cluster(CLUSTER).for_world_size(world)
            start = time.perf_counter()
            configs = enumerate_configs(world, cluster.devices_per_node, len(graph.layers), spec.global_batch_size,
                                        DTYPE, host_offload=cluster.host_link is not None)
            grid_s, grid_label = best_uniform_s(ConfigPricer(spec.model, graph, cluster), configs)
            try:
                found = search_plans(spec.model, graph, cluster, world, spec.global_batch_size, DTYPE)
                planner_s, planner_label = found.best.step_time_s, found.best.config.summary
            except PlanError:
                planner_s, planner_label = math.inf, "nothing fits"
            elapsed = time.perf_counter() - start
            ratio = planner_s / grid_s if math.isfinite(grid_s) else (1.0 if math.isinf(planner_s) else 0.0)
            if math.isfinite(grid_s):
                ratios.append(ratio)
            print(f"{name:<12}{world:>6}{planner_s:>13.3f}{grid_s:>11.3f}{ratio:>8.3f}{len(configs) * 6:>14}"
                  f"{elapsed:>10.1f}  {planner_label} / {grid_label}", flush=True)
    if ratios:
        print(f"\nworst ratio {max(ratios):.4f}, best ratio {min(ratios):.4f} over {len(ratios)} cases where a "
              "uniform configuration fits (ratio <= 1 means the planner is at least as fast)")


if __name__ == "__main__":
    main()
