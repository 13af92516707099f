"""Search data x tensor meshes and per-layer strategies for the fastest plan that fits in device memory.

For each mesh dp x tp = world size (tp inside one node, dp dividing the global batch), every layer kind gets
the strategies it supports (`replicate`; `tensor` when it has column/row linear units whose sizes divide
by tp), the ILP picks one per kind, and the mesh with the lowest predicted step time wins. Ties go to the
smaller tp, then the order meshes are listed, so the same inputs give the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from costmodel import Cluster, optimizer_step_time_s
from planner.ilp import Option, choose_strategies
from planner.layer_costs import StrategyCost, layer_cost
from planner.model_graph import LayerFacts, ModelGraph
from planner.plan_schema import PlanError

MIB = 2**20


class InfeasiblePlanError(PlanError):
    """No mesh and strategy combination fits in device memory; the message says how much would be needed."""


@dataclass
class MeshResult:
    """The best assignment for one mesh."""

    dp: int
    tp: int
    strategies: dict[str, str]
    """Kind -> strategy."""
    costs: dict[str, StrategyCost]
    """Layer path -> cost under the chosen strategy."""
    step_time_s: float
    optimizer_s: float
    peak_memory_bytes: int


def candidate_meshes(world_size: int, devices_per_node: int, global_batch_size: int) -> list[tuple[int, int]]:
    """(dp, tp) pairs: tp divides world size and fits in a node, dp divides the global batch."""
    meshes = []
    for tp in range(1, world_size + 1):
        if world_size % tp or tp > devices_per_node:
            continue
        dp = world_size // tp
        if global_batch_size % dp == 0:
            meshes.append((dp, tp))
    return meshes


def supports_tensor_parallel(model: nn.Module, layer: LayerFacts, tp: int) -> bool:
    """True when every unit's column linears split their outputs, and the row linear its inputs, by tp."""
    if tp < 2 or not layer.tp_units:
        return False
    for unit in layer.tp_units:
        for rel in unit.colwise:
            if model.get_submodule(f"{layer.path}.{rel}" if layer.path else rel).out_features % tp:
                return False
        row = model.get_submodule(f"{layer.path}.{unit.rowwise}" if layer.path else unit.rowwise)
        if row.in_features % tp:
            return False
    return True


def _strategy_options(model: nn.Module, graph: ModelGraph, dp: int, tp: int, batch_scale: float,
                      cluster: Cluster) -> dict[str, dict[str, StrategyCost]]:
    table: dict[str, dict[str, StrategyCost]] = {}
    for kind, layers in graph.kinds().items():
        layer = layers[0]
        strategies = ["replicate"] + (["tensor"] if supports_tensor_parallel(model, layer, tp) else [])
        table[kind] = {s: layer_cost(layer, s, dp, tp, batch_scale, cluster) for s in strategies}
    return table


def peak_memory_bytes(costs: list[StrategyCost]) -> int:
    """Model states and saved activations of every layer, plus the largest layer's FSDP all-gather buffer."""
    gathered = max((c.unsharded_parameters_bytes - c.parameters_bytes for c in costs), default=0)
    return sum(c.memory_bytes for c in costs) + gathered


def solve_mesh(model: nn.Module, graph: ModelGraph, dp: int, tp: int, cluster: Cluster,
               global_batch_size: int) -> MeshResult | None:
    """Best per-kind strategies on one mesh, or None if no assignment fits in memory."""
    batch_scale = (global_batch_size / dp) / graph.sample_batch_size
    table = _strategy_options(model, graph, dp, tp, batch_scale, cluster)
    counts = {kind: len(layers) for kind, layers in graph.kinds().items()}
    options = {k: {s: Option(c.time_s, c.memory_bytes) for s, c in opts.items()} for k, opts in table.items()}
    # the all-gather buffer does not depend much on the choice: reserve the largest one up front
    reserve = max(max(c.unsharded_parameters_bytes for c in opts.values()) for opts in table.values())
    chosen = choose_strategies(options, counts, cluster.usable_memory_bytes - reserve)
    if chosen is None:
        return None
    costs = {layer.path: table[layer.kind][chosen[layer.kind]] for layer in graph.layers}
    optimizer_s = optimizer_step_time_s(sum(c.sharded_num_params for c in costs.values()), cluster,
                                        optimizer="adamw", num_tensors=sum(1 for _ in model.parameters()))
    step_time_s = sum(c.time_s for c in costs.values()) + optimizer_s
    return MeshResult(dp=dp, tp=tp, strategies=chosen, costs=costs, step_time_s=step_time_s,
                      optimizer_s=optimizer_s, peak_memory_bytes=peak_memory_bytes(list(costs.values())))


def least_memory_bytes(model: nn.Module, graph: ModelGraph, dp: int, tp: int, cluster: Cluster,
                       global_batch_size: int) -> int:
    """Per-device memory of the leanest strategy per kind on this mesh (for the infeasibility message)."""
    batch_scale = (global_batch_size / dp) / graph.sample_batch_size
    table = _strategy_options(model, graph, dp, tp, batch_scale, cluster)
    leanest = {k: min(opts.values(), key=lambda c: c.memory_bytes) for k, opts in table.items()}
    return peak_memory_bytes([leanest[layer.kind] for layer in graph.layers])


def search_meshes(model: nn.Module, graph: ModelGraph, cluster: Cluster, world_size: int, global_batch_size: int,
                  mesh: tuple[int, int] | None = None) -> MeshResult:
    """The fastest feasible MeshResult over candidate meshes (or only `mesh` when given)."""
    if mesh is not None:
        dp, tp = mesh
        if dp * tp != world_size:
            raise PlanError(f"mesh dp={dp} x tp={tp} has {dp * tp} ranks but world size is {world_size}")
        if global_batch_size % dp:
            raise PlanError(f"global batch {global_batch_size} is not divisible by dp={dp}")
        meshes = [mesh]
    else:
        meshes = candidate_meshes(world_size, cluster.devices_per_node, global_batch_size)
        if not meshes:
            raise PlanError(f"no dp x tp mesh for world size {world_size}: dp must divide the global batch "
                            f"{global_batch_size} and tp must fit in a node of {cluster.devices_per_node}")
    best: MeshResult | None = None
    for dp, tp in meshes:
        result = solve_mesh(model, graph, dp, tp, cluster, global_batch_size)
        if result is not None and (best is None or result.step_time_s < best.step_time_s * (1 - 1e-9)):
            best = result
    if best is None:
        needed = min(least_memory_bytes(model, graph, dp, tp, cluster, global_batch_size) for dp, tp in meshes)
        raise InfeasiblePlanError(
            f"no plan fits: the leanest plan needs {needed / MIB:,.1f} MiB per device, but "
            f"{cluster.name} allows {cluster.usable_memory_bytes / MIB:,.1f} MiB "
            f"({cluster.usable_memory_fraction:.0%} of {cluster.device_memory_bytes / MIB:,.0f} MiB). "
            "Use more devices, a smaller global batch, or a cluster with more memory per device.")
    return best
