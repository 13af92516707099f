"""`plan()`: from a MODEL reference and a cluster to a validated Plan, without allocating model weights."""

from __future__ import annotations

from costmodel import Cluster, load_cluster
from planner.evaluate_config import stages_of_layers
from planner.model_graph import ModelGraph, build_model_graph
from planner.model_spec import load_model_spec
from planner.plan import (
    PARAM_DTYPES,
    SCHEMA_VERSION,
    Alternative,
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
from planner.search import MIB, SearchResult, search_plans


def _ms(seconds: float) -> float:
    return float(f"{seconds * 1e3:.6g}")


def _mib(num_bytes: float) -> float:
    return round(num_bytes / MIB, 3)


def plan(model: str, cluster: str | Cluster, world_size: int, mesh: tuple[int, int, int] | None = None,
         seed: int = 0, param_dtype: str = "float32") -> Plan:
    """Plan training of `model` (`path/to/file.py:function`) on `world_size` devices of `cluster`.

    `cluster` is a preset name, a YAML path or a Cluster. `mesh=(pp, dp, tp)` pins the mesh instead of
    searching it. `param_dtype` other than float32 trains in mixed precision (fp32 master weights).
    The model is built on the meta device and traced on fake tensors: no weight is allocated.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise PlanError(f"world size must be a positive integer, got {world_size!r}")
    if param_dtype not in PARAM_DTYPES:
        raise PlanError(f"param_dtype must be one of {list(PARAM_DTYPES)}, got {param_dtype!r}")
    if mesh is not None and (len(mesh) != 3 or any(not isinstance(v, int) or v < 1 for v in mesh)):
        raise PlanError(f"mesh must be three positive integers (pp, dp, tp), got {mesh!r}")
    profile = cluster if isinstance(cluster, Cluster) else load_cluster(cluster)
    profile = profile.for_world_size(world_size)
    spec = load_model_spec(model, device="meta")
    graph = build_model_graph(spec)
    found = search_plans(spec.model, graph, profile, world_size, spec.global_batch_size, param_dtype, mesh)
    result = plan_from_search(model, graph, profile, world_size, spec.global_batch_size, found, seed)
    result.validate("plan")
    return result


def plan_from_search(source: str, graph: ModelGraph, cluster: Cluster, world_size: int, global_batch_size: int,
                     found: SearchResult, seed: int = 0) -> Plan:
    """Write the search's best configuration as a Plan."""
    best = found.best
    config = best.config
    stage_of = stages_of_layers(best.stage_starts, len(graph.layers))
    layers = []
    for i, layer in enumerate(graph.layers):
        priced = best.choice[i]
        option = priced.option
        units = [TensorParallelUnitPlan(list(u.colwise), u.rowwise) for u in layer.tp_units] \
            if option.strategy == "tensor" else []
        memory = priced.state_bytes + priced.micro.activation_bytes
        layers.append(LayerPlan(path=layer.path, kind=layer.kind, strategy=option.strategy, tensor_parallel=units,
                                sequence_parallel=option.sequence_parallel, stage=stage_of[i],
                                checkpoint=option.checkpoint, offload_activations=option.offload_activations,
                                predicted_time_ms=_ms(priced.unit_time_s * config.num_microbatches),
                                predicted_memory_mib=_mib(memory)))
    b, m = best.breakdown_s, best.memory_bytes
    prediction = Prediction(
        step_time_ms=_ms(best.step_time_s), compute_ms=_ms(b["compute_s"]),
        communication_ms=_ms(b["communication_s"]), optimizer_ms=_ms(b["optimizer_s"]),
        peak_memory_mib=_mib(best.peak_memory_bytes), parameters_mib=_mib(m["parameters"]),
        gradients_mib=_mib(m["gradients"]), optimizer_states_mib=_mib(m["optimizer_states"]),
        activations_mib=_mib(m["activations"] + m["buffers"]), memory_limit_mib=_mib(cluster.usable_memory_bytes),
        bubble_ms=_ms(b["bubble_s"]), recompute_ms=_ms(b["recompute_s"]))
    alternatives = [Alternative(summary=a.config.summary, step_time_ms=_ms(a.result.step_time_s),
                                peak_memory_mib=_mib(a.result.peak_memory_bytes), why_not=a.why_not)
                    for a in found.alternatives]
    return Plan(
        schema_version=SCHEMA_VERSION,
        model=ModelRef(source=source, fingerprint=graph.fingerprint, num_parameters=graph.num_params,
                       global_batch_size=global_batch_size),
        cluster=cluster.to_dict(), world_size=world_size,
        mesh=MeshShape(pp=config.pp, dp=config.dp, tp=config.tp),
        data_parallel=DataParallelPlan(kind=config.dp_kind, replicate=config.replicate, offload=config.offload),
        precision=PrecisionPlan(param_dtype=config.param_dtype),
        pipeline=PipelinePlan(schedule=config.schedule, num_microbatches=config.num_microbatches,
                              virtual_stages=config.virtual_stages),
        layers=layers, predicted=prediction, alternatives=alternatives, seed=seed)
