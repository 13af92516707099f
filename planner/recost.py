"""Price an existing Plan with the search's own cost functions: the check behind `meshplan validate`.

A plan a person edited by hand (another checkpointing choice, another cut, another mesh) is turned back into
what the search works with: its ParallelConfig, the first layer of every stage, and every layer's PricedOption
from ConfigPricer. `ConfigPricer.predict` then prices that assignment exactly as it priced the search's own
choice, so re-costing an unedited plan on the cluster it was planned for reproduces its recorded prediction
to the last digit, and an edited plan gets the prediction the search would have given it.

Before pricing, the plan is checked against the model: the graph fingerprint, the layer chain (paths in order),
the tensor-parallel units (the ones the planner found in the real modules), and that every layer's choice is
one the search offers on this mesh and cluster. Each refusal is a PlanError naming the field and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from costmodel import Cluster
from planner.api import layer_predictions, prediction_of
from planner.config_space import ParallelConfig
from planner.evaluate_config import ConfigPricer, ConfigResult, PricedOption
from planner.layer_options import LayerOption
from planner.linear_modules import is_linear_like
from planner.model_graph import ModelGraph
from planner.plan import Plan, Prediction
from planner.plan_schema import PlanError


@dataclass
class Recosted:
    """A plan priced again: the search's result for its choices and the Prediction a plan would record."""

    result: ConfigResult
    prediction: Prediction
    layers: list[tuple[float, float]]
    """(predicted_time_ms, predicted_memory_mib) per layer, as the plan records them."""
    notes: list[str]
    """What the cost model does not see in this plan (priced as if it were not there)."""
    cluster_name: str

    @property
    def fits(self) -> bool:
        return self.result.feasible


def config_of(plan: Plan) -> ParallelConfig:
    """The search's ParallelConfig for a plan's mesh, micro-batching, schedule and data-parallel flavour."""
    return ParallelConfig(pp=plan.mesh.pp, dp=plan.mesh.dp, tp=plan.mesh.tp,
                          num_microbatches=plan.pipeline.num_microbatches, schedule=plan.pipeline.schedule,
                          virtual_stages=plan.pipeline.virtual_stages, dp_kind=plan.data_parallel.kind,
                          replicate=plan.data_parallel.replicate, param_dtype=plan.precision.param_dtype,
                          global_batch_size=plan.model.global_batch_size, offload=plan.data_parallel.offload,
                          reduce_dtype=plan.precision.reduce_dtype)


HEAD_COUNT_ATTRIBUTES = ("num_heads", "n_heads", "n_head", "num_attention_heads", "num_key_value_heads",
                         "num_kv_heads", "n_kv_heads")
"""Attributes attention modules (torch, transformers, nanoGPT-style code) keep their head counts in."""


def _tensor_shards(plan: Plan, layer) -> int:
    """How many ways a `tensor` layer splits its heads (tp)."""
    return plan.mesh.tp


def check_tensor_parallel_divides(plan: Plan, model: nn.Module) -> None:
    """Refuse a tensor-parallel layer whose attention heads do not split evenly over tp: the ranks would each hold
    a fraction of a head (the traced `view(b, s, n_heads, d)` then fails inside a rank). Head counts are read from
    the attributes in HEAD_COUNT_ATTRIBUTES; uneven linear features are left to DTensor, which shards them."""
    for i, layer in enumerate(plan.layers):
        shards = _tensor_shards(plan, layer)
        if layer.strategy != "tensor" or shards == 1:  # tensor2d gathers whole heads inside its units
            continue
        where = f"layers[{i}] ({layer.path or '<root>'})"
        root = model.get_submodule(layer.path) if layer.path else model
        for name, module in root.named_modules():
            for attr in HEAD_COUNT_ATTRIBUTES:
                heads = getattr(module, attr, None)
                if isinstance(heads, int) and not isinstance(heads, bool) and heads > 0 and heads % shards:
                    inside = f"{layer.path}.{name}" if name else layer.path
                    raise PlanError(f"{where} is tensor-parallel over {shards} ranks but {inside or '<root>'}."
                                    f"{attr} is {heads}, which {shards} does not divide: each rank must hold "
                                    f"whole heads. Set strategy 'replicate' on this layer, or a mesh.tp that "
                                    f"divides {heads} (re-run `meshplan plan --mesh ...`)")


def check_plan_describes_graph(plan: Plan, model: nn.Module, graph: ModelGraph, cluster: Cluster) -> None:
    """Raise PlanError when the plan does not describe this model on this cluster (field and fix named)."""
    if plan.model.fingerprint != graph.fingerprint:
        raise PlanError(f"field 'model.fingerprint' is {plan.model.fingerprint} but the model traces to "
                        f"{graph.fingerprint}: the model changed since planning; re-run `meshplan plan`")
    paths = [layer.path for layer in graph.layers]
    planned = [layer.path for layer in plan.layers]
    if planned != paths:
        missing = [p for p in paths if p not in planned]
        extra = [p for p in planned if p not in paths]
        detail = (f"missing {missing}" if missing else "") + ("; " if missing and extra else "") + \
            (f"not layers of the model {extra}" if extra else "")
        raise PlanError(f"field 'layers' must list the model's layer chain in order {paths}; "
                        f"{detail or 'the order differs'}. Fix the paths or re-run `meshplan plan`")
    if plan.mesh.tp > cluster.devices_per_node:
        raise PlanError(f"field 'mesh.tp' is {plan.mesh.tp} but a node of {cluster.name} has "
                        f"{cluster.devices_per_node} devices; tensor parallelism must stay inside a node")
    for i, (layer, facts) in enumerate(zip(plan.layers, graph.layers, strict=True)):
        where = f"layers[{i}] ({layer.path or '<root>'})"
        for unit in layer.tensor_parallel:
            for rel in [*unit.colwise, unit.rowwise]:
                full = f"{layer.path}.{rel}" if layer.path else rel
                try:
                    module = model.get_submodule(full)
                except AttributeError as err:
                    raise PlanError(f"{where}.tensor_parallel names {rel!r}, but the model has no module "
                                    f"{full!r}; use the layer's linears") from err
                if not is_linear_like(module):
                    raise PlanError(f"{where}.tensor_parallel names {rel!r}, a {type(module).__name__}, not an "
                                    "nn.Linear (or transformers Conv1D); only linears can be split by columns "
                                    "or rows")
        if layer.strategy in ("tensor", "tensor2d"):
            found = sorted((sorted(u.colwise), u.rowwise) for u in facts.tp_units)
            given = sorted((sorted(u.colwise), u.rowwise) for u in layer.tensor_parallel)
            if found != given:
                expected = "; ".join(f"{','.join(c)} -> {r}" for c, r in found) or "none"
                raise PlanError(f"{where}.tensor_parallel does not match the units the planner found in the "
                                f"model ({expected}); list exactly those, or set strategy 'replicate'")
    check_tensor_parallel_divides(plan, model)


def option_of(plan: Plan, index: int, priced: list[PricedOption]) -> PricedOption:
    """The PricedOption of layer `index`'s choice, or a PlanError listing the choices this layer has."""
    layer = plan.layers[index]
    wanted = LayerOption(layer.strategy, layer.checkpoint, layer.offload_activations, layer.sequence_parallel,
                         layer.tp_rows)
    for p in priced:
        if p.option == wanted:
            return p
    offered = ", ".join(p.option.label for p in priced)
    hints = []
    if layer.strategy == "tensor":
        hints.append(f"strategy 'tensor' needs tp > 1 and every unit's linears divisible by tp={plan.mesh.tp}")
    if layer.strategy == "tensor2d":
        hints.append(f"strategy 'tensor2d' needs units whose linears split their input features by tp_rows="
                     f"{layer.tp_rows} and output features by tp / tp_rows, batch-first activations, a micro-batch "
                     f"divisible by tp_rows, and checkpoint 'none' or 'full'")
    if layer.strategy == "vocab":
        hints.append(f"strategy 'vocab' needs tp > 1, and an untied nn.Embedding or an nn.Linear head "
                     f"feeding F.cross_entropy whose vocabulary is divisible by tp={plan.mesh.tp}")
    if layer.sequence_parallel:
        hints.append("sequence_parallel needs strategy 'tensor' on tp > 1 with nn.Linear units (not Conv1D)")
    if layer.offload_activations:
        hints.append("offload_activations needs a cluster profile with a host link, a layer that saves "
                     "activations, and checkpoint 'none'")
    if layer.checkpoint != "none":
        hints.append("checkpointing is offered only for layers that save more than their input")
    raise PlanError(f"layers[{index}] ({layer.path or '<root>'}) chooses {wanted.label}, which the planner does "
                    f"not offer for this layer here ({'; '.join(hints) or 'see the offered choices'}); "
                    f"pick one of: {offered}")


def recost_plan(plan: Plan, model: nn.Module, graph: ModelGraph, cluster: Cluster) -> Recosted:
    """Price the plan's own choices with ConfigPricer.predict (the search's cost path) on `cluster`."""
    check_plan_describes_graph(plan, model, graph, cluster)
    config = config_of(plan)
    pricer = ConfigPricer(model, graph, cluster)
    choice = [option_of(plan, i, pricer.priced_options(i, config)) for i in range(len(plan.layers))]
    starts = [i for i, layer in enumerate(plan.layers) if i == 0 or layer.stage != plan.layers[i - 1].stage]
    result = pricer.predict(config, starts, choice)
    step_s = result.step_time_s if result.feasible else sum(
        result.breakdown_s[k] for k in ("compute_s", "communication_s", "offload_s", "optimizer_s", "bubble_s"))
    notes = []
    if plan.data_parallel.kind == "zero3" and not plan.data_parallel.reshard_after_forward:
        notes.append("data_parallel.reshard_after_forward false: priced as resharding after forward (the cost "
                     "model does not price keeping gathered parameters)")
    prediction = prediction_of(result, cluster, step_time_s=step_s)
    return Recosted(result, prediction, layer_predictions(result), notes, cluster.name)
