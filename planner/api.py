"""`plan()`: from a MODEL reference and a cluster to a validated Plan, without allocating model weights."""

from __future__ import annotations

from costmodel import Cluster, load_cluster
from planner.evaluate_config import ConfigResult, stages_of_layers
from planner.layer_options import LayerOption
from planner.model_graph import LayerFacts, ModelGraph, build_model_graph
from planner.model_spec import ModelSpecError, load_model_spec, model_file_sha256
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
    StagePrediction,
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


def layer_plan_of(layer: LayerFacts, option: LayerOption, stage: int, time_ms: float = 0.0,
                  memory_mib: float = 0.0) -> LayerPlan:
    """How the plan writes `layer` choosing `option` (its units listed when it is tensor-parallel)."""
    units = [TensorParallelUnitPlan(list(u.colwise), u.rowwise) for u in layer.tp_units] \
        if option.strategy in ("tensor", "tensor2d") else []
    return LayerPlan(path=layer.path, kind=layer.kind, strategy=option.strategy, tensor_parallel=units,
                     tp_rows=option.tp_rows, sequence_parallel=option.sequence_parallel, stage=stage,
                     checkpoint=option.checkpoint, offload_activations=option.offload_activations,
                     predicted_time_ms=time_ms, predicted_memory_mib=memory_mib)


def plan_from_search(source: str, graph: ModelGraph, cluster: Cluster, world_size: int, global_batch_size: int,
                     found: SearchResult, seed: int = 0) -> Plan:
    """Write the search's best configuration as a Plan (recording the sha256 of `source`'s file when it names one)."""
    try:
        source_sha256 = model_file_sha256(source)
    except (ModelSpecError, OSError):  # a source that is not a file (a test's synthetic graph)
        source_sha256 = ""
    best = found.best
    config = best.config
    stage_of = stages_of_layers(best.stage_starts, len(graph.layers))
    layers = []
    for i, (layer, (time_ms, memory_mib)) in enumerate(zip(graph.layers, layer_predictions(best), strict=True)):
        layers.append(layer_plan_of(layer, best.choice[i].option, stage_of[i], time_ms, memory_mib))
    alternatives = [Alternative(summary=a.config.summary, step_time_ms=_ms(a.result.step_time_s),
                                peak_memory_mib=_mib(a.result.peak_memory_bytes), why_not=a.why_not)
                    for a in found.alternatives]
    return Plan(
        schema_version=SCHEMA_VERSION,
        model=ModelRef(source=source, fingerprint=graph.fingerprint, num_parameters=graph.num_params,
                       global_batch_size=global_batch_size, source_sha256=source_sha256),
        cluster=cluster.to_dict(), world_size=world_size,
        mesh=MeshShape(pp=config.pp, dp=config.dp, tp=config.tp),
        data_parallel=DataParallelPlan(kind=config.dp_kind, replicate=config.replicate, offload=config.offload),
        precision=PrecisionPlan(param_dtype=config.param_dtype, reduce_dtype=config.reduce_dtype),
        pipeline=PipelinePlan(schedule=config.schedule, num_microbatches=config.num_microbatches,
                              virtual_stages=config.virtual_stages),
        layers=layers, predicted=prediction_of(best, cluster), alternatives=alternatives, seed=seed)


def layer_predictions(result: ConfigResult) -> list[tuple[float, float]]:
    """(predicted_time_ms, predicted_memory_mib) of every layer of a solved configuration, as a plan records
    them: its unit time over the step's micro-batches, and its model states plus one micro-batch's kept
    activations."""
    m = result.config.num_microbatches
    return [(_ms(c.unit_time_s * m), _mib(c.state_bytes + c.micro.activation_bytes)) for c in result.choice]


def prediction_of(result: ConfigResult, cluster: Cluster, step_time_s: float | None = None) -> Prediction:
    """The plan's Prediction of a priced configuration (ConfigPricer.predict), rounded as plans store it.

    `step_time_s` replaces the result's step time (infinite when it does not fit in memory)."""
    b, m = result.breakdown_s, result.memory_bytes
    return Prediction(
        step_time_ms=_ms(result.step_time_s if step_time_s is None else step_time_s), compute_ms=_ms(b["compute_s"]),
        communication_ms=_ms(b["communication_s"]), optimizer_ms=_ms(b["optimizer_s"]),
        peak_memory_mib=_mib(result.peak_memory_bytes), parameters_mib=_mib(m["parameters"]),
        gradients_mib=_mib(m["gradients"]), optimizer_states_mib=_mib(m["optimizer_states"]),
        activations_mib=_mib(m["activations"]), memory_limit_mib=_mib(cluster.usable_memory_bytes),
        bubble_ms=_ms(b["bubble_s"]), recompute_ms=_ms(b["recompute_s"]), buffers_mib=_mib(m["buffers"]),
        offload_ms=_ms(b["offload_s"]),
        stages=[StagePrediction(forward_ms=_ms(f), backward_ms=_ms(bw)) for f, bw in result.stage_times_s])
