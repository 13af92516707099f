"""Search every configuration for the fastest plan that fits: branch and bound over ParallelConfigs.

1. Enumerate configurations (planner/config_space.py): mesh pp x dp x tp, micro-batch count, pipeline
   schedule and virtual stages, data-parallel flavour and HSDP.
2. Order them by a cheap lower bound: m + (pp - 1) / v times the sum of every layer's fastest time per
   micro-batch, spread over pp ranks (no communication, no memory pressure).
3. Walk them in that order. Stop when the bound reaches the best exact step time found. Otherwise screen
   the configuration (LP relaxation inside the pipeline partitioner: an optimistic step time) and, if that
   can still win, solve it exactly (ILP per rank on the screened cut).
Ties go to the configuration enumerated first, so the same inputs give the same plan.

The search also keeps, for `meshplan show --why`, the best configuration of each other shape (mesh and
data-parallel flavour) with why it lost.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from costmodel import Cluster
from costmodel.progress import Progress
from planner.config_space import ParallelConfig, enumerate_configs
from planner.data_parallel_costs import rank_state_bytes
from planner.evaluate_config import ConfigPricer, ConfigResult, pipeline_step_factor
from planner.model_graph import ModelGraph
from planner.plan_schema import PlanError

MIB = 2**20
NUM_ALTERNATIVES = 4


class InfeasiblePlanError(PlanError):
    """No configuration fits in device memory; the message says how much would be needed and what helps."""


@dataclass
class AlternativeResult:
    result: ConfigResult | None
    config: ParallelConfig
    why_not: str
    least_memory_bytes: int = 0


@dataclass
class SearchResult:
    best: ConfigResult
    alternatives: list[AlternativeResult]
    configs_total: int
    configs_screened: int
    configs_solved: int


def lower_bound_s(pricer: ConfigPricer, config: ParallelConfig) -> float:
    factor = pipeline_step_factor(config.pp, config.num_microbatches, config.virtual_stages)
    return factor * pricer.min_micro_time_s(config.tp, config.micro_batch_size, config.param_dtype) / config.pp


def states_fit(graph: ModelGraph, cluster: Cluster, config: ParallelConfig) -> bool:
    """Cheap necessary condition: model states alone, as if every parameter were sharded by tp and spread evenly
    over pp stages, fit in device memory."""
    local = graph.num_params // (config.tp * config.pp)
    return rank_state_bytes(local, config.data_parallel_setup()).total_bytes <= cluster.usable_memory_bytes


def least_memory_bytes(pricer: ConfigPricer, config: ParallelConfig) -> int:
    """Memory of the leanest options with layers spread evenly over stages, without buffers: a lower bound of
    what this shape needs (every option's relaxed memory, as the screening counts it)."""
    n = len(pricer.layers)
    tables = [pricer.priced_options(i, config) for i in range(n)]
    per_stage = -(-n // config.num_stages)
    in_flight = pricer.in_flight(config)
    worst = 0.0
    for rank in range(config.pp):
        total = 0.0
        for stage in range(rank, config.num_stages, config.pp):
            for i in range(stage * per_stage, min(n, (stage + 1) * per_stage)):
                total += min(pricer.ilp_option(config, p, in_flight[stage]).relaxed_memory_bytes for p in tables[i])
        worst = max(worst, total)
    return int(worst)


def _shape(config: ParallelConfig) -> tuple:
    return (config.pp, config.dp, config.tp, config.dp_kind, config.replicate, config.offload)


def _why_not(alt: ConfigResult, best: ConfigResult) -> str:
    slower = alt.step_time_s / best.step_time_s - 1
    if abs(slower) < 1e-9:
        return "ties with the chosen plan; the chosen one comes first in the search order"
    diffs = {name.removesuffix("_s"): alt.breakdown_s.get(name, 0.0) - best.breakdown_s.get(name, 0.0)
             for name in ("compute_s", "communication_s", "offload_s", "bubble_s", "optimizer_s")}
    worst = max(diffs, key=lambda k: diffs[k])
    return (f"{slower:+.1%} step time; most of it is {worst} "
            f"({diffs[worst] * 1e3:+.3f} ms against the chosen plan)")


def search_plans(model: nn.Module, graph: ModelGraph, cluster: Cluster, world_size: int, global_batch_size: int,
                 param_dtype: str = "float32", mesh: tuple[int, int, int] | None = None) -> SearchResult:
    """The fastest feasible configuration, exactly solved, plus the best of each other shape."""
    if mesh is not None:
        pp, dp, tp = mesh
        if pp * dp * tp != world_size:
            raise PlanError(f"mesh pp={pp} x dp={dp} x tp={tp} has {pp * dp * tp} ranks but world size is "
                            f"{world_size}")
        if global_batch_size % dp:
            raise PlanError(f"global batch {global_batch_size} is not divisible by dp={dp}")
        if pp > len(graph.layers):
            raise PlanError(f"pp={pp} needs at least {pp} layers in the chain, the model has {len(graph.layers)}")
    configs = enumerate_configs(world_size, cluster.devices_per_node, len(graph.layers), global_batch_size,
                                param_dtype, mesh, host_offload=cluster.host_link is not None)
    if not configs:
        raise PlanError(f"no pp x dp x tp mesh for world size {world_size}: dp must divide the global batch "
                        f"{global_batch_size}, tp must fit in a node of {cluster.devices_per_node}, and pp must "
                        f"not exceed the {len(graph.layers)} layers of the chain")
    pricer = ConfigPricer(model, graph, cluster)
    if mesh is not None and mesh[0] > len(pricer.allowed_starts):
        raise PlanError(f"pp={mesh[0]} cannot be cut: layers that share a parameter must sit on one pipeline stage "
                        f"({_tied_description(model)}), which leaves {len(pricer.allowed_starts)} places a stage "
                        "can start; use a smaller pp (or untie the weights)")
    ordered = sorted(range(len(configs)), key=lambda i: (lower_bound_s(pricer, configs[i]), i))
    best: ConfigResult | None = None
    best_per_shape: dict[tuple, ConfigResult] = {}
    screened_count = solved_count = 0
    progress = Progress("plan", len(configs))
    for visited, index in enumerate(ordered):
        config = configs[index]
        if best is not None and lower_bound_s(pricer, config) >= best.step_time_s:
            progress.finish(f"stopped after {visited} of {len(configs)}: the rest cannot beat "
                            f"{best.step_time_s * 1e3:.3f} ms")
            break
        progress.step(config.summary + ("" if best is None else f"  (best {best.step_time_s * 1e3:.3f} ms)"))
        if not states_fit(graph, cluster, config):
            continue
        screened = pricer.screen(config)
        screened_count += 1
        if not screened.feasible:
            continue
        shape = _shape(config)
        if shape not in best_per_shape or screened.step_time_s < best_per_shape[shape].step_time_s:
            best_per_shape[shape] = screened
        if best is not None and screened.step_time_s >= best.step_time_s:
            continue
        exact = pricer.solve(screened)
        solved_count += 1
        if exact.feasible and (best is None or exact.step_time_s < best.step_time_s * (1 - 1e-9)):
            best = exact
    progress.finish(f"searched {len(configs)} configurations")
    if best is None:
        raise _infeasible(pricer, configs, cluster)
    alternatives = []
    others = sorted((r for s, r in best_per_shape.items() if s != _shape(best.config)),
                    key=lambda r: r.step_time_s)
    for screened in others[:NUM_ALTERNATIVES]:
        exact = pricer.solve(screened)
        if exact.feasible:
            alternatives.append(AlternativeResult(exact, exact.config, _why_not(exact, best)))
    alternatives.sort(key=lambda a: a.result.step_time_s)
    return SearchResult(best, alternatives, len(configs), screened_count, solved_count)


def _tied_description(model: nn.Module) -> str:
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    tied = [" = ".join(group) for group in names.values() if len(group) > 1]
    return "tied: " + "; ".join(tied) if tied else "no tied parameters"


def _infeasible(pricer: ConfigPricer, configs: list[ParallelConfig], cluster: Cluster) -> InfeasiblePlanError:
    needs = [(least_memory_bytes(pricer, c), i) for i, c in enumerate(configs)]
    needed, index = min(needs)
    config = configs[index]
    hints = ["use more devices", "pick a cluster with more memory per device"]
    if config.micro_batch_size > 1:
        hints.insert(0, f"use a smaller global batch (the leanest plan already runs micro-batches of "
                        f"{config.micro_batch_size})")
    if not getattr(cluster, "host_to_device_bytes_per_s", None):
        hints.append("give the cluster profile a host<->device bandwidth so activations and model states can be "
                     "offloaded to the host")
    return InfeasiblePlanError(
        f"no plan fits: the leanest plan ({config.summary}) needs {needed / MIB:,.1f} MiB per device, but "
        f"{cluster.name} allows {cluster.usable_memory_bytes / MIB:,.1f} MiB ({cluster.usable_memory_fraction:.0%} "
        f"of {cluster.device_memory_bytes / MIB:,.0f} MiB). To make it fit: " + "; ".join(hints) + ".")

