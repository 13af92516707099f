"""The collectives of a tensor-parallel layer per micro-batch, as DTensor runs them, and what 2-D tensor
parallelism keeps and holds beyond 1-D. Both lists are checked against a census of the collectives DTensor
issues (tests/test_tensor_parallel_collectives.py).

1-D (`tensor`, Megatron style, torch's ColwiseParallel / RowwiseParallel over the contiguous tp group, axis
`tp`): forward all-reduces each unit's output; backward all-reduces the unit input's gradient once (q, k and v
share one DTensor input, runtime/unit_input.py; column linears reading different tensors reduce each theirs).
With sequence parallelism each all-reduce becomes an all-gather and a reduce-scatter, and the layer's output
(forward) and input gradient (backward) are all-gathered at its boundary.

2-D (`tensor2d`):

The tp group of a layer is laid out as a grid of `rows` x `cols` ranks (rank r * cols + c; the columns are
contiguous ranks). Inside each tensor-parallel unit the runtime (runtime/tensor_parallel_2d.py) keeps
activations split by batch over the rows and by features over the columns, and every linear's weight split by
input features over the rows and output features over the columns, so each rank stores 1/(rows x cols) of the
weights. Every linear all-gathers its weight over the rows and its input over the columns and multiplies
locally (SUMMA written as all-gathers, as in Optimus); the unit's output is gathered back to every rank, so the
layer's boundaries are the same as under 1-D tensor parallelism.

Per micro-batch, with A = a linear's input bytes and W = its weight bytes:
- forward: every linear all-gathers W / cols over the rows; the row linear all-gathers A / rows over the
  columns; the unit output (O bytes) is all-gathered over the columns (O / rows) and then over the rows (O).
- backward: every linear reduce-scatters its weight gradient (W / cols) over the rows; the row linear
  reduce-scatters its input gradient (A / rows) over the columns; the unit input's gradient (one per distinct
  input, as in 1-D) is all-reduced over the columns (A / rows) and all-gathered over the rows (A). (Bias
  gradients leave backward as partial sums over the rows, reduced later with the gradients by the
  data-parallel wrapper: out / cols elements each, not priced.)
Against 1-D tensor parallelism (two all-reduces of O per unit, forward and backward) this trades activation
traffic that does not shrink with tp for weight traffic that shrinks with the rows: it pays when a micro-batch
holds many tokens per hidden feature (long sequences, narrow layers) and tp is large.
Memory beyond 1-D: every linear keeps its gathered weight (W / cols) for backward, and the row linear its input
gathered over the columns (A / rows instead of A / tp). Biases are split over the columns only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from costmodel import Cluster, all_gather_time_s, all_reduce_time_s, reduce_scatter_time_s
from planner.model_graph import LayerFacts

_TIME_OF = {"all_gather": all_gather_time_s, "reduce_scatter": reduce_scatter_time_s,
            "all_reduce": all_reduce_time_s}


@dataclass(frozen=True)
class Collective:
    """One collective of one micro-batch."""

    kind: str
    """`all_gather` (num_bytes = the gathered output), `reduce_scatter` (the input) or `all_reduce`."""
    axis: str
    """`tp` (the whole tp group), `rows` (ranks c, c + cols, ...) or `cols` (ranks r * cols .. r * cols + cols - 1)."""
    num_bytes: float
    phase: str
    """`forward` or `backward`."""


def supports_tensor_parallel_2d(layer: LayerFacts, rows: int, cols: int, micro_batch_size: int) -> bool:
    """True when every unit linear splits its input features by rows and output features by cols, and reads a
    batch-first activation whose micro-batch splits by rows."""
    if not layer.tp_linears or micro_batch_size % rows:
        return False
    return all(lin.batch_first and lin.in_features % rows == 0 and lin.out_features % cols == 0
               for lin in layer.tp_linears)


def _column_inputs(layer: LayerFacts) -> list:
    """One column linear per distinct (unit, input): those whose shared input gradient is reduced."""
    seen, found = set(), []
    for lin in layer.tp_linears:
        if not lin.rowwise and (lin.unit, lin.input_node) not in seen:
            seen.add((lin.unit, lin.input_node))
            found.append(lin)
    return found


def tensor_1d_collectives(layer: LayerFacts, act_scale: float) -> list[Collective]:
    """The collectives of one micro-batch of a `tensor` layer without sequence parallelism."""
    found = [Collective("all_reduce", "tp", lin.output_bytes * act_scale, "forward")
             for lin in layer.tp_linears if lin.rowwise]
    return found + [Collective("all_reduce", "tp", lin.input_bytes * act_scale, "backward")
                    for lin in _column_inputs(layer)]


def tensor_sp_collectives(layer: LayerFacts, act_scale: float) -> list[Collective]:
    """The collectives of one micro-batch of a sequence-parallel `tensor` layer (runtime/sequence_parallel.py):
    per unit input an all-gather (sequence shards -> whole) and per unit output a reduce-scatter (partial ->
    sequence shards), mirrored in backward; the layer's output is all-gathered back to every rank in forward,
    and its input's gradient in backward."""
    found = []
    for phase in ("forward", "backward"):
        found += [Collective("all_gather", "tp", lin.input_bytes * act_scale, phase) for lin in _column_inputs(layer)]
        found += [Collective("reduce_scatter", "tp", lin.output_bytes * act_scale, phase)
                  for lin in layer.tp_linears if lin.rowwise]
        found.append(Collective("all_gather", "tp", layer.input_bytes * act_scale, phase))
    return found


def recomputed_collectives(collectives: list[Collective]) -> list[Collective]:
    """The forward collectives a checkpointed `tensor` layer runs again in backward (selective or full).

    The recomputation stops once it has rebuilt the last tensor backward needs (non-reentrant checkpoint's early
    stop), which comes before the layer's last unit output is reduced: so every forward collective but the last
    row linear's reduction and, under sequence parallelism, the layer output's all-gather (checked against the
    census of what DTensor runs, tests/test_collective_census.py)."""
    forward = [c for c in collectives if c.phase == "forward"]
    last_reduce = max((i for i, c in enumerate(forward) if c.kind in ("all_reduce", "reduce_scatter")), default=None)
    boundary = len(forward) - 1 if forward and forward[-1].kind == "all_gather" and any(
        c.kind == "reduce_scatter" for c in forward) else None
    return [dataclasses.replace(c, phase="backward") for i, c in enumerate(forward) if i not in (last_reduce, boundary)]


def tensor_2d_collectives(layer: LayerFacts, rows: int, cols: int, act_scale: float,
                          param_bytes: int) -> list[Collective]:
    """The collectives of one micro-batch (see the module docstring); act_scale turns traced activation bytes
    into this micro-batch's, param_bytes is the bytes of one parameter element."""
    found = []
    for lin in layer.tp_linears:
        weight_bytes = lin.in_features * lin.out_features * param_bytes
        found.append(Collective("all_gather", "rows", weight_bytes / cols, "forward"))
        found.append(Collective("reduce_scatter", "rows", weight_bytes / cols, "backward"))
        inputs = lin.input_bytes * act_scale
        if lin.rowwise:
            output = lin.output_bytes * act_scale
            found += [Collective("all_gather", "cols", inputs / rows, "forward"),
                      Collective("all_gather", "cols", output / rows, "forward"),
                      Collective("all_gather", "rows", output, "forward"),
                      Collective("reduce_scatter", "cols", inputs / rows, "backward")]
    for lin in _column_inputs(layer):
        inputs = lin.input_bytes * act_scale
        found += [Collective("all_reduce", "cols", inputs / rows, "backward"),
                  Collective("all_gather", "rows", inputs, "backward")]
    return found


def communication_s(collectives: list[Collective], rows: int, cols: int, cluster: Cluster) -> tuple[float, float]:
    """(forward, backward) seconds of the collectives, each over the first group of its axis (for 1-D: rows =
    1, cols = tp)."""
    groups = {"tp": list(range(rows * cols)), "rows": [r * cols for r in range(rows)], "cols": list(range(cols))}
    seconds = {"forward": 0.0, "backward": 0.0}
    for c in collectives:
        seconds[c.phase] += _TIME_OF[c.kind](c.num_bytes, groups[c.axis], cluster)
    return seconds["forward"], seconds["backward"]


def tensor_2d_extra_saved_bytes(layer: LayerFacts, rows: int, cols: int, act_scale: float,
                                param_bytes: int) -> int:
    """Bytes kept from forward to backward beyond what 1-D tensor parallelism over rows x cols keeps: the
    gathered weights, and the row linears' inputs gathered over the columns."""
    tp = rows * cols
    extra = 0.0
    for lin in layer.tp_linears:
        extra += lin.in_features * lin.out_features * param_bytes / cols
        if lin.rowwise:
            extra += lin.input_bytes * act_scale * (1 / rows - 1 / tp)
    return int(extra)


def tensor_2d_local_num_params(layer: LayerFacts, rows: int, cols: int) -> int:
    """Parameters on one rank: unit weights split over the grid, unit biases over its columns, the rest whole."""
    weights = sum(lin.in_features * lin.out_features for lin in layer.tp_linears)
    biases = sum(lin.out_features for lin in layer.tp_linears if lin.has_bias)
    return int(layer.num_params - weights - biases + weights / (rows * cols) + biases / cols)
