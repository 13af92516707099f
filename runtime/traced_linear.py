"""Tensor-parallel styles for linears in pipeline stage modules built by the torch.export tracer.

`torch.distributed.pipelining.pipeline` exports the model and rebuilds each stage's module hierarchy with
`InterpreterModule`s: `blocks.2.attn.q` keeps its FQN and its `weight`/`bias` parameters, but it is no longer an
`nn.Linear`, it is a one-op graph `aten.linear(x, weight, bias)`. torch's ColwiseParallel / RowwiseParallel
refuse any module that is not an `nn.Linear`, although what they do to one (shard the parameters, lay out the
input, redistribute the output) only needs those parameters. The two styles here apply exactly torch's
partition and input/output functions to such a traced linear. Likewise a traced embedding (one
`aten.embedding` over its own `weight`) gets RowwiseParallel's embedding partition (vocabulary-parallel lookup).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
from torch.export.unflatten import InterpreterModule

from planner.linear_modules import linear_like_features


def _is_traced_linear(module: nn.Module) -> bool:
    """True for an InterpreterModule whose graph is one `aten.linear` over its own `weight` (and `bias`)."""
    if not isinstance(module, InterpreterModule):
        return False
    ops = [node for node in module.graph.nodes if node.op == "call_function"]
    if len(ops) != 1 or ops[0].target != torch.ops.aten.linear.default:
        return False
    attrs = [node.target for node in module.graph.nodes if node.op == "get_attr"]
    return attrs in (["weight"], ["weight", "bias"]) and module.weight.dim() == 2


def is_traced_embedding(module: nn.Module) -> bool:
    """True for an InterpreterModule whose graph is one `aten.embedding` over its own `weight`."""
    if not isinstance(module, InterpreterModule):
        return False
    ops = [node for node in module.graph.nodes if node.op == "call_function"]
    attrs = [node.target for node in module.graph.nodes if node.op == "get_attr"]
    return len(ops) == 1 and ops[0].target == torch.ops.aten.embedding.default and attrs == ["weight"]


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of an nn.Linear, a transformers Conv1D or a traced linear; None otherwise."""
    features = linear_like_features(module)
    if features is not None:
        return features
    if _is_traced_linear(module):
        out_features, in_features = module.weight.shape
        return in_features, out_features
    return None


class TracedColwiseParallel(ColwiseParallel):
    """ColwiseParallel for a traced linear: weight and bias sharded on dim 0, output sharded on the last dim."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, self._partition_linear_fn,
                                 partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                                 partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


class TracedRowwiseParallel(RowwiseParallel):
    """RowwiseParallel for a traced linear: weight sharded on dim 1, bias replicated, input sharded on the last
    dim (as torch sets for an nn.Linear), output all-reduced to a replicated plain tensor."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self.desired_input_layouts = (Shard(-1),)
        return distribute_module(module, device_mesh, self._partition_linear_fn,
                                 partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                                 partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


class TracedEmbeddingRowwiseParallel(RowwiseParallel):
    """RowwiseParallel for a traced embedding: the table sharded on the vocabulary (dim 0), the ids replicated,
    the partial lookups all-reduced (torch's nn.Embedding branch of RowwiseParallel)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self.desired_input_layouts = (Replicate(),)
        return distribute_module(module, device_mesh, self._partition_embedding_fn,
                                 partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                                 partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


def colwise_style(module: nn.Module, **kwargs) -> ColwiseParallel:
    """The column style for this linear, keeping activations as DTensors (global shapes stay valid) unless
    `kwargs` say otherwise (ColwiseParallel's arguments)."""
    kwargs.setdefault("use_local_output", False)
    return ColwiseParallel(**kwargs) if isinstance(module, nn.Linear) else TracedColwiseParallel(**kwargs)


def rowwise_style(module: nn.Module, **kwargs) -> RowwiseParallel:
    """The row style for this linear; by default its output is a plain replicated tensor (RowwiseParallel's
    arguments in `kwargs`)."""
    return RowwiseParallel(**kwargs) if isinstance(module, nn.Linear) else TracedRowwiseParallel(**kwargs)


def embedding_rowwise_style(module: nn.Module) -> RowwiseParallel:
    """The vocabulary-parallel style for an nn.Embedding or a traced embedding: replicated ids in, replicated
    plain output."""
    return RowwiseParallel(input_layouts=Replicate()) if isinstance(module, nn.Embedding) \
        else TracedEmbeddingRowwiseParallel(input_layouts=Replicate())
