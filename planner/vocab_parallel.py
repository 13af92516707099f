"""Find layers that can be sharded on the vocabulary: the token embedding and the output head with its loss.

Vocabulary parallelism (Megatron-LM's VocabParallelEmbedding / loss parallelism; DTensor's
`RowwiseParallel(input_layouts=Replicate())` on nn.Embedding, `ColwiseParallel(output_layouts=Shard(-1))` on the
head and `loss_parallel()` around the cross-entropy) splits the rows of a vocabulary-sized weight over the tp
ranks:

- embedding: each rank looks up the tokens of its vocabulary range (others read as zeros) and one all-reduce of
  the (batch, seq, hidden) output sums the partial lookups; the backward needs no communication (the output
  gradient is replicated, each rank scatters it into its own rows).
- head: the input is replicated, each rank computes the logits of its vocabulary range and the cross-entropy
  runs on those shards: three all-reduces of one number per row (the max, the sum of exponentials, the target's
  logit) instead of gathering the (batch, seq, vocab) logits; the backward all-reduces the input gradient.

So parameters, gradients, optimizer states, the head's matmul FLOPs, the logits and the softmax saved for
backward all divide by tp. Only a layer that *is* the nn.Embedding or nn.Linear qualifies (GPT's `wte` and
`head`, Llama's `model.embed_tokens` and `lm_head`), with a weight no other module shares (tied embeddings are
left replicated), and a head only when its output reaches the loss through views and one
`log_softmax -> nll_loss` (what `F.cross_entropy` traces to), since `loss_parallel` handles only that loss.
"""

from __future__ import annotations

import networkx as nx
import torch
from torch import nn

_aten = torch.ops.aten
_LOSS_PATH_OPS = {"_log_softmax", "nll_loss_forward", "detach", "_to_copy", "clone"}
"""Non-view ops allowed between the head's output and the loss (views and getitem always are)."""
VOCAB_ROLES = ("embedding", "head")


def _nbytes(value) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def _is_view_op(node: torch.fx.Node) -> bool:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return True  # getitem
    return any(ret.alias_info is not None for ret in target._schema.returns)


def weight_is_shared(model: nn.Module, module: nn.Module) -> bool:
    """True when `module.weight` is registered under more than one name (a tied embedding and head)."""
    weight = getattr(module, "weight", None)
    return sum(p is weight for _, p in model.named_parameters(remove_duplicate=False)) > 1


def vocab_role(model: nn.Module, path: str) -> str:
    """`embedding` or `head` from the module type at `path`, "" for anything else (the runtime's reading)."""
    module = model.get_submodule(path) if path else model
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Linear):
        return "head"
    return ""


def _plain_embedding(module: nn.Embedding) -> bool:
    """DTensor's vocabulary-sharded lookup masks out-of-range ids; padding rows, max_norm and sparse
    gradients have no sharding rule there."""
    return module.padding_idx is None and module.max_norm is None and not module.sparse


def _head_feeds_loss(graph: nx.DiGraph, out_node: str, node_by_name: dict[str, torch.fx.Node],
                     phase: dict[str, str], layer_nodes: set[str]) -> bool:
    """The head's output reaches only views, one last-dim log_softmax and one nll_loss, all in its layer."""
    seen = {"_log_softmax": 0, "nll_loss_forward": 0}
    for name in nx.descendants(graph, out_node):
        node = node_by_name[name]
        if phase[name] != "forward" or node.op == "output":
            continue
        if name not in layer_nodes:
            return False
        if _is_view_op(node):
            continue
        op = node.target.overloadpacket.__name__
        if op not in _LOSS_PATH_OPS:
            return False
        if op == "_log_softmax" and node.args[1] not in (-1, node.meta["val"].dim() - 1):
            return False
        if op in seen:
            seen[op] += 1
    return seen == {"_log_softmax": 1, "nll_loss_forward": 1}


def mark_vocab_parallel(model: nn.Module, graph: nx.DiGraph, fact, layer_nodes: set[str],
                        node_by_name: dict[str, torch.fx.Node], linear_outputs: dict[str, str],
                        module_path: dict[str, str], phase: dict[str, str], tp_region: dict[str, bool]) -> None:
    """Set `fact.vocab_parallel` and its sizes when the layer qualifies, and mark its forward nodes that the
    vocabulary sharding divides by tp in `tp_region` (their backward follows by sequence number)."""
    if not fact.path:
        return
    module = model.get_submodule(fact.path)
    if not isinstance(module, (nn.Embedding, nn.Linear)) or weight_is_shared(model, module):
        return
    own = {n for n in layer_nodes if module_path[n] == fact.path and node_by_name[n].op == "call_function"}
    if isinstance(module, nn.Embedding):
        lookups = [n for n in own if node_by_name[n].target == _aten.embedding.default]
        if not _plain_embedding(module) or len(lookups) != 1:
            return
        region = own  # the lookup reads 1/tp of the table; its backward writes 1/tp of the gradient
        fact.vocab_forward_allreduce_bytes = _nbytes(node_by_name[lookups[0]].meta.get("val"))
        fact.vocab_backward_allreduce_bytes = 0
        fact.vocab_parallel = "embedding"
    else:
        outputs = [n for n, p in linear_outputs.items() if p == fact.path and n in layer_nodes]
        if len(outputs) != 1 or not _head_feeds_loss(graph, outputs[0], node_by_name, phase, layer_nodes):
            return
        logits = node_by_name[outputs[0]].meta["val"]
        rows = logits.numel() // module.out_features
        region = own | (nx.descendants(graph, outputs[0]) & layer_nodes)
        fact.vocab_forward_allreduce_bytes = 3 * rows * logits.element_size()
        fact.vocab_backward_allreduce_bytes = rows * module.in_features * logits.element_size()
        fact.vocab_parallel = "head"
    for name in region:
        tp_region[name] = True
    fact.tp_num_params = sum(p.numel() for p in module.parameters())


def supports_vocab_parallel(model: nn.Module, layer, tp: int) -> bool:
    """True when the layer qualifies (see the module docstring) and its vocabulary divides by tp."""
    if tp < 2 or not layer.vocab_parallel:
        return False
    module = model.get_submodule(layer.path)
    vocab = module.num_embeddings if isinstance(module, nn.Embedding) else module.out_features
    return vocab % tp == 0
