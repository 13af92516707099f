"""Find Megatron-style tensor-parallel units inside a layer: linears split by columns, then one split by rows.

A unit is a set of nn.Linear modules that read the layer's own input side (q, k, v; or fc; or gate and up)
and whose outputs flow, through non-linear ops only, into exactly one nn.Linear (the out projection). The
column-split linears produce shards that stay sharded through the ops between them; the row-split linear
consumes those shards and one all-reduce restores the full output. This is how Megatron-LM shards attention
and MLP blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx


@dataclass(frozen=True)
class TensorParallelUnit:
    """One column-then-row pair: `colwise` linears feed `rowwise`; paths relative to the layer."""

    colwise: tuple[str, ...]
    rowwise: str


@dataclass(frozen=True)
class UnitLinearFacts:
    """One linear of a tensor-parallel unit as traced at the sample batch: what 2-D tensor parallelism moves."""

    path: str
    """Relative to the layer, as in TensorParallelUnit."""
    rowwise: bool
    """The unit's last linear (its output leaves the unit); False for the column linears that read its input."""
    in_features: int
    out_features: int
    has_bias: bool
    input_bytes: int
    """The activation the linear reads (float32 at the sample batch)."""
    output_bytes: int
    batch_first: bool
    """The input's leading dimension is the sample batch: 2-D tensor parallelism splits it over the grid's rows."""
    unit: int = 0
    """Index of the linear's unit in the layer's tp_units."""
    input_node: str = ""
    """The traced node the linear reads: column linears of one unit reading the same node share one DTensor
    input, whose gradient is reduced once (runtime/unit_input.py)."""


def _upstream_linears(graph: nx.DiGraph, start: str, linear_of: dict[str, str], layer_nodes: set[str]) -> set[str]:
    """Linear modules whose output reaches `start` without passing another linear, inside the layer."""
    found, seen, pending = set(), set(), [start]
    while pending:
        node = pending.pop()
        for pred in graph.predecessors(node):
            if pred in seen or pred not in layer_nodes:
                continue
            seen.add(pred)
            if pred in linear_of:
                found.add(linear_of[pred])
            else:
                pending.append(pred)
    return found


def find_tensor_parallel_units(graph: nx.DiGraph, layer_path: str, layer_nodes: set[str],
                               linear_outputs: dict[str, str], linear_inputs: dict[str, str],
                               ) -> list[TensorParallelUnit]:
    """Units inside one layer.

    linear_outputs: forward node -> linear module path, for the node that produces that linear's output.
    linear_inputs: linear module path -> forward node that is its activation input.
    Returns [] unless every linear of the layer belongs to exactly one unit (a partial split would leave
    sharded activations where replicated ones are expected).
    """
    linears = sorted({p for n, p in linear_outputs.items() if n in layer_nodes})
    upstream = {lin: _upstream_linears(graph, linear_inputs[lin], linear_outputs, layer_nodes)
                for lin in linears if lin in linear_inputs}
    consumers: dict[str, set[str]] = {lin: set() for lin in linears}
    for lin, ups in upstream.items():
        for up in ups:
            consumers.setdefault(up, set()).add(lin)
    # A column-split linear must read a replicated activation: the layer input, or the output of a row-split
    # linear already placed (e.g. mlp.fc reads attn.proj's all-reduced output). Grow units to a fixpoint.
    units, covered, rowwise = [], set(), set()
    changed = True
    while changed:
        changed = False
        for row in linears:
            ups = upstream.get(row, set())
            if row in covered or not ups or ups & covered:
                continue
            if all(upstream.get(up, set()) <= rowwise and consumers.get(up) == {row} for up in ups):
                units.append(TensorParallelUnit(tuple(sorted(_relative(u, layer_path) for u in ups)),
                                                _relative(row, layer_path)))
                covered |= ups | {row}
                rowwise.add(row)
                changed = True
    if covered != set(linears):
        return []
    return units


def _relative(path: str, layer_path: str) -> str:
    return path[len(layer_path) + 1:] if layer_path and path.startswith(layer_path + ".") else path
