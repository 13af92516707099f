"""Apply a Plan's vocabulary parallelism (strategy `vocab`): the embedding and the output head with its loss.

As torchtitan does for Llama:
- an nn.Embedding gets `RowwiseParallel(input_layouts=Replicate())`: its table is sharded on the vocabulary
  (dim 0), each rank looks up the ids in its range (DTensor masks the rest) and the partial outputs are
  all-reduced into a replicated plain tensor;
- the head nn.Linear gets `ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)`: the logits stay
  a DTensor sharded on the vocabulary, and the loss and its backward run under
  `torch.distributed.tensor.parallel.loss_parallel()` (`loss_context`), which computes the cross-entropy on
  the shards with three small all-reduces instead of gathering the logits.

The loss is then a replicated DTensor; `loss_value` turns it into a plain tensor for logging and averaging.
Under a pipeline the layers are traced stage submodules (one `aten.embedding` or `aten.linear` over their own
weight: runtime/traced_linear.py's styles); their roles are checked on the model before it is traced
(`check_vocab_layers`), and the schedule's loss on the last stage, with its backward, runs under
`loss_context` (runtime/pipeline.py).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import loss_parallel, parallelize_module

from planner.plan import Plan
from planner.plan_schema import PlanError
from planner.vocab_parallel import vocab_role, weight_is_shared
from runtime.traced_linear import colwise_style, embedding_rowwise_style, is_traced_embedding, linear_features


def _check_vocab_layer(model: nn.Module, plan: Plan, index: int, tp: int) -> str:
    """The layer's role (`embedding` or `head`) or a PlanError that names the layer and the fix."""
    layer = plan.layers[index]
    where = f"layer {layer.path}"
    try:
        module = model.get_submodule(layer.path) if layer.path else model
    except AttributeError as err:
        raise PlanError(f"{where}: the model has no such module; the plan was made for another model") from err
    role = vocab_role(model, layer.path)
    if not role:
        raise PlanError(f"{where}: strategy 'vocab' needs an nn.Embedding or an nn.Linear head, got a "
                        f"{type(module).__name__}; use strategy 'replicate'")
    if weight_is_shared(model, module):
        raise PlanError(f"{where}: its weight is tied to another module; strategy 'vocab' would shard one copy "
                        "only. Use strategy 'replicate'")
    vocab = module.num_embeddings if role == "embedding" else module.out_features
    if vocab % tp:
        raise PlanError(f"{where}: a vocabulary of {vocab} is not divisible by tp={tp}; use strategy 'replicate'")
    if role == "head" and index != len(plan.layers) - 1:
        raise PlanError(f"{where}: a 'vocab' nn.Linear must be the output head (the last layer), whose logits go "
                        "into the loss; use strategy 'replicate'")
    if role == "embedding" and (module.padding_idx is not None or module.max_norm is not None or module.sparse):
        raise PlanError(f"{where}: an embedding with padding_idx, max_norm or sparse gradients cannot be sharded "
                        "on the vocabulary; use strategy 'replicate'")
    return role


def check_vocab_layers(model: nn.Module, plan: Plan, tp: int) -> dict[str, str]:
    """The role (`embedding` or `head`) of every `vocab` layer of `model` (an nn.Module, before any pipeline
    tracing), by path; a PlanError naming the layer and the fix for one that cannot be sharded."""
    return {layer.path: _check_vocab_layer(model, plan, index, tp)
            for index, layer in enumerate(plan.layers) if layer.strategy == "vocab"}


def apply_vocab_parallel(model: nn.Module, plan: Plan, tp_mesh: DeviceMesh,
                         roles: dict[str, str] | None = None) -> None:
    """Shard every `vocab` layer of `model` over `tp_mesh` (see the module docstring). `model` is the whole
    model, or a pipeline stage module with `roles` from `check_vocab_layers` on the model before tracing."""
    if roles is None:
        roles = check_vocab_layers(model, plan, tp_mesh.size())
    for layer in plan.layers:
        if layer.strategy != "vocab":
            continue
        module = model.get_submodule(layer.path)
        if roles[layer.path] == "embedding":
            style = embedding_rowwise_style(module)
        else:
            style = colwise_style(module, output_layouts=Shard(-1), use_local_output=False)
        if not isinstance(module, (nn.Embedding, nn.Linear)) and not (
                is_traced_embedding(module) if roles[layer.path] == "embedding" else linear_features(module)):
            raise PlanError(f"layer {layer.path}: strategy 'vocab' found a {type(module).__name__} in the pipeline "
                            "stage, not one embedding lookup or linear over its own weight; use strategy "
                            "'replicate'")
        parallelize_module(module, tp_mesh, style)


def loss_context(plan: Plan) -> contextlib.AbstractContextManager:
    """`loss_parallel()` when some layer is `vocab` (so the logits may be vocabulary-sharded DTensors); enter it
    around the loss and its backward. It changes only DTensor cross-entropy, so an embedding-only plan is
    unaffected."""
    if any(layer.strategy == "vocab" for layer in plan.layers):
        return loss_parallel()
    return contextlib.nullcontext()


def loss_value(loss: torch.Tensor) -> torch.Tensor:
    """A detached plain tensor of the loss (a replicated DTensor under loss parallelism)."""
    loss = loss.detach()
    return loss.full_tensor() if isinstance(loss, DTensor) else loss
