"""`plan()`: from a MODEL reference and a cluster to a validated Plan, without allocating model weights."""

from __future__ import annotations

from costmodel import Cluster, load_cluster
from planner.model_graph import build_model_graph
from planner.model_spec import load_model_spec
from planner.plan import (
    SCHEMA_VERSION,
    DataParallelPlan,
    LayerPlan,
    MeshShape,
    ModelRef,
    PipelinePlan,
    Plan,
    PrecisionPlan,
    Prediction,
    TensorParallelUnitPlan,
)
from planner.plan_schema import PlanError
from planner.search import MIB, search_meshes


def _ms(seconds: float) -> float:
    return float(f"{seconds * 1e3:.6g}")


def _mib(num_bytes: float) -> float:
    return round(num_bytes / MIB, 3)


def plan(model: str, cluster: str | Cluster, world_size: int, mesh: tuple[int, int, int] | None = None,
         seed: int = 0) -> Plan:
    """Plan training of `model` (`path/to/file.py:function`) on `world_size` devices of `cluster`.

    `cluster` is a preset name, a YAML path or a Cluster. `mesh=(pp, dp, tp)` pins the mesh instead of
    searching.
    The model is built on the meta device and traced on fake tensors: no weight is allocated.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise PlanError(f"world size must be a positive integer, got {world_size!r}")
    profile = cluster if isinstance(cluster, Cluster) else load_cluster(cluster)
    profile = profile.for_world_size(world_size)
    spec = load_model_spec(model, device="meta")
    graph = build_model_graph(spec)
    if mesh is not None:
        if len(mesh) != 3 or mesh[0] != 1:
            raise PlanError(f"mesh must be (pp, dp, tp) with pp = 1 for now (pipeline search is not built yet), "
                            f"got {mesh!r}")
        mesh = mesh[1:]
    best = search_meshes(spec.model, graph, profile, world_size, spec.global_batch_size, mesh)

    layers = []
    for layer in graph.layers:
        strategy = best.strategies[layer.kind]
        cost = best.costs[layer.path]
        units = [TensorParallelUnitPlan(list(u.colwise), u.rowwise) for u in layer.tp_units] \
            if strategy == "tensor" else []
        layers.append(LayerPlan(path=layer.path, kind=layer.kind, strategy=strategy, tensor_parallel=units,
                                predicted_time_ms=_ms(cost.time_s), predicted_memory_mib=_mib(cost.memory_bytes)))
    costs = list(best.costs.values())
    prediction = Prediction(
        step_time_ms=_ms(best.step_time_s),
        compute_ms=_ms(sum(c.compute_s for c in costs)),
        communication_ms=_ms(sum(c.communication_s for c in costs)),
        optimizer_ms=_ms(best.optimizer_s),
        peak_memory_mib=_mib(best.peak_memory_bytes),
        parameters_mib=_mib(sum(c.parameters_bytes for c in costs)),
        gradients_mib=_mib(sum(c.gradients_bytes for c in costs)),
        optimizer_states_mib=_mib(sum(c.optimizer_states_bytes for c in costs)),
        activations_mib=_mib(sum(c.activations_bytes for c in costs)),
        memory_limit_mib=_mib(profile.usable_memory_bytes),
    )
    result = Plan(
        schema_version=SCHEMA_VERSION,
        model=ModelRef(source=model, fingerprint=graph.fingerprint, num_parameters=graph.num_params,
                       global_batch_size=spec.global_batch_size),
        cluster=profile.to_dict(),
        world_size=world_size,
        mesh=MeshShape(pp=1, dp=best.dp, tp=best.tp),
        data_parallel=DataParallelPlan(kind="zero3"),
        precision=PrecisionPlan(),
        pipeline=PipelinePlan(),
        layers=layers,
        predicted=prediction,
        seed=seed,
    )
    result.validate("plan")
    return result
