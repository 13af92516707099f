"""What one layer can do, and what each choice costs per micro-batch on one device.

A LayerOption is one point of the per-layer search space: tensor-parallel or replicated, activation
checkpointing (none / selective / full), and activation offload to the host. `price_layer_option` turns
the traced LayerFacts into time per micro-batch and activation bytes per in-flight micro-batch.

Formulas (all scaled by batch_scale = micro-batch / traced sample batch; inside tensor-parallel units FLOPs,
traffic and saved bytes are divided by tp):
- compute = roofline time of forward + backward FLOPs and memory-bound traffic (costmodel.op_time_s).
- recompute: `full` repeats the whole forward (and its tensor-parallel all-reduce); `selective` repeats only
  the non-matmul forward ops (memory-bound), keeping matmul outputs, and the forward collectives its
  recomputation passes through (planner/tensor_parallel_collectives.py `recomputed_collectives`; under sequence
  parallelism the unit inputs' all-gathers and all but the last unit's reduce-scatter).
- tensor-parallel communication: one all-reduce of the row-linear output in forward and one of the unit
  input's gradient in backward (Megatron's g and f; q, k and v share one DTensor input, runtime/unit_input.py),
  over the contiguous tp group (planner/tensor_parallel_collectives.py, which also lists `tensor2d`'s). Under
  sequence parallelism: an all-gather and a reduce-scatter per unit each way, and the layer output's all-gather.
- vocabulary parallelism (`vocab`, planner/vocab_parallel.py): the embedding's or head's marked ops divide by
  tp; communication is the layer's own forward all-reduce (embedding output, or the loss's per-row max, sum of
  exponentials and target logit) and backward all-reduce (the head's input gradient). Offered only with
  checkpoint `none` and no offload (the head's saved logits are what vocabulary sharding already divides).
- activations kept per in-flight micro-batch: `none` = what autograd saves (traced); `selective` = the layer
  input + matmul outputs; `full` = the layer input only (under sequence parallelism the input and the matmul
  outputs outside units are sequence shards, 1/tp); offload keeps nothing on the device.
- offload: the saved bytes go to the host after forward and come back for backward, at the profile's
  host<->device bandwidth, not overlapped with compute (an upper bound).
Blind spots: activations are traced in float32 and scaled by the parameter dtype's size; recompute of a
`full` layer briefly rematerialises its activations (counted as a working buffer by the search, not here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from costmodel import (
    Cluster,
    all_gather_time_s,
    all_reduce_time_s,
    dtype_bytes,
    exposed_time_s,
    host_transfer_time_s,
    issued_time_s,
    op_time_s,
)
from planner.linear_modules import linear_like_features
from planner.model_graph import LayerFacts
from planner.tensor_parallel_collectives import (
    communication_s,
    recomputed_collectives,
    tensor_1d_collectives,
    tensor_2d_collectives,
    tensor_2d_extra_saved_bytes,
    tensor_2d_local_num_params,
    tensor_sp_collectives,
)

CHECKPOINTS = ("none", "selective", "full")
TRACED_DTYPE_BYTES = 4  # the planner traces on float32 fake tensors


@dataclass(frozen=True)
class LayerOption:
    """One choice for one layer."""

    strategy: str
    """`replicate`, `tensor`, `tensor2d` or `vocab`."""
    checkpoint: str = "none"
    offload_activations: bool = False
    sequence_parallel: bool = False
    """`tensor` only: norms, dropout and the residual stream inside the layer are sharded on the sequence."""
    tp_rows: int = 0
    """`tensor2d` only: the rows of the tp grid (planner/tensor_parallel_collectives.py)."""

    @property
    def label(self) -> str:
        grid = f"({self.tp_rows}-row grid)" if self.tp_rows else ""
        parts = [self.strategy + grid + ("+sp" if self.sequence_parallel else "")]
        if self.checkpoint != "none":
            parts.append(f"ckpt-{self.checkpoint}")
        if self.offload_activations:
            parts.append("offload")
        return "+".join(parts)


@dataclass(frozen=True)
class OptionCost:
    """One layer under one option on one device: time per micro-batch and bytes per in-flight micro-batch."""

    compute_s: float
    """Forward + backward."""
    recompute_s: float
    tp_communication_s: float
    offload_s: float
    activation_bytes: int
    """Kept on the device from this layer's forward until its backward, per micro-batch in flight."""
    working_bytes: int
    """Activations live while this layer runs (what checkpointing rematerialises for backward)."""
    local_num_params: int
    """Parameters on this device after tensor-parallel sharding (before data-parallel sharding)."""
    backward_compute_s: float = 0.0
    """The backward's share of compute_s (what gradient reductions can hide behind, with recompute_s)."""
    forward_s: float = 0.0
    """The forward's share of time_s: forward compute, its tensor-parallel all-reduce, half the offload
    traffic (the rest runs in backward). Only the pipeline timeline uses it."""

    @property
    def time_s(self) -> float:
        return self.compute_s + self.recompute_s + self.tp_communication_s + self.offload_s


def per_rank(total: float, in_units: float, shard: int, outside: int = 1) -> float:
    """One rank's share of a layer quantity: the part inside tensor-parallel units divides by `shard`, the rest
    by `outside` (tp under sequence parallelism, else 1)."""
    return (total - in_units) / outside + in_units / shard


def supports_tensor_parallel(model: nn.Module, layer: LayerFacts, tp: int) -> bool:
    """True when every unit's column linears split their outputs, and the row linear its inputs, by tp."""
    if tp < 2 or not layer.tp_units:
        return False

    def features(rel: str) -> tuple[int, int]:  # (in, out) of an nn.Linear or a transformers Conv1D
        return linear_like_features(model.get_submodule(f"{layer.path}.{rel}" if layer.path else rel))

    for unit in layer.tp_units:
        if any(features(rel)[1] % tp for rel in unit.colwise) or features(unit.rowwise)[0] % tp:
            return False
    return True


def layer_options(layer: LayerFacts, tensor_parallel_ok: bool, cluster: Cluster,
                  sequence_parallel_ok: bool = False, vocab_parallel_ok: bool = False,
                  tensor_2d_rows: Sequence[int] = ()) -> list[LayerOption]:
    """Every option this layer supports on this mesh, in a fixed order (fastest-first for ties).

    Sequence parallelism is offered with tensor parallelism when the caller allows it (nn.Linear units); so is
    vocabulary parallelism, alone (no checkpointing or offload). 2-D tensor
    parallelism is offered on each grid of `tensor_2d_rows`, without selective checkpointing (which would
    re-gather every weight in backward)."""
    strategies = [("replicate", False)] + ([("tensor", False)] if tensor_parallel_ok else []) + (
        [("tensor", True)] if tensor_parallel_ok and sequence_parallel_ok else [])
    offloads = [False, True] if cluster.host_link is not None and layer.saved_bytes else [False]
    checkpoints = CHECKPOINTS if layer.fwd_flops > 0 and layer.saved_bytes > layer.input_bytes else ("none",)
    options = [LayerOption(s, c, o, sp) for s, sp in strategies for o in offloads for c in checkpoints
               if not (o and c != "none")]
    options += [LayerOption("tensor2d", c, o, tp_rows=rows) for rows in tensor_2d_rows for o in offloads
                for c in checkpoints if c != "selective" and not (o and c != "none")]
    return options + ([LayerOption("vocab")] if vocab_parallel_ok else [])


def price_layer_option(layer: LayerFacts, option: LayerOption, tp: int, batch_scale: float, cluster: Cluster,
                       param_dtype: str = "float32") -> OptionCost:
    """Time per micro-batch and activation bytes of `layer` under `option` (see the module docstring)."""
    shard = tp if option.strategy in ("tensor", "tensor2d", "vocab") else 1
    act_scale = batch_scale * dtype_bytes(param_dtype) / TRACED_DTYPE_BYTES
    # sequence parallelism shards the rest of the layer (norms, residual, dropout) too
    outside = shard if option.sequence_parallel else 1

    def split(total: float, in_units: float) -> float:
        return per_rank(total, in_units, shard, outside)

    fwd_s, bwd_s, fwd_memory_s = _compute_times_s(layer, shard, batch_scale, act_scale, cluster, param_dtype,
                                                  outside)
    allreduce_s = backward_s = recompute_comm_s = 0.0
    if shard > 1 and option.strategy == "tensor" and layer.tp_linears:
        collectives = (tensor_sp_collectives if option.sequence_parallel else tensor_1d_collectives)(layer, act_scale)
        forward_comm_s, backward_comm_s = communication_s(collectives, 1, tp, cluster)
        allreduce_s = exposed_time_s(forward_comm_s, fwd_s, cluster.overlap.tensor_parallel)
        backward_s = exposed_time_s(backward_comm_s, bwd_s, cluster.overlap.tensor_parallel)
        # a selective recomputation re-runs the forward collectives it passes (full: priced as the whole forward's)
        recompute_comm_s = exposed_time_s(communication_s(recomputed_collectives(collectives), 1, tp, cluster)[1],
                                          fwd_memory_s, cluster.overlap.tensor_parallel)
    elif shard > 1 and option.strategy == "tensor":  # facts without per-linear detail (hand-built tables)
        group = list(range(tp))
        allreduce_s = all_reduce_time_s(layer.tp_allreduce_bytes * act_scale, group, cluster)
        allreduce_s = exposed_time_s(allreduce_s, fwd_s, cluster.overlap.tensor_parallel)
        if option.sequence_parallel:  # the layer's output is gathered back to replicated, forward and backward
            allreduce_s += all_gather_time_s(layer.input_bytes * act_scale, group, cluster)
        backward_s = allreduce_s
    if shard > 1 and option.strategy == "vocab":
        allreduce_s = _vocab_communication_s(layer, tp, act_scale, fwd_s, bwd_s, cluster)
    saved = int(split(layer.saved_bytes, layer.tp_saved_bytes) * act_scale)
    # a checkpoint keeps the layer input as the layer sees it: sequence shards under sequence parallelism
    inputs = int(layer.input_bytes * act_scale / outside)
    local_num_params = int(per_rank(layer.num_params, layer.tp_num_params, shard))
    if option.strategy == "tensor2d":
        rows, cols = option.tp_rows, tp // option.tp_rows
        collectives = tensor_2d_collectives(layer, rows, cols, act_scale, dtype_bytes(param_dtype))
        forward_comm_s, backward_comm_s = communication_s(collectives, rows, cols, cluster)
        allreduce_s = exposed_time_s(forward_comm_s, fwd_s, cluster.overlap.tensor_parallel)
        backward_s = exposed_time_s(backward_comm_s, bwd_s, cluster.overlap.tensor_parallel)
        saved += tensor_2d_extra_saved_bytes(layer, rows, cols, act_scale, dtype_bytes(param_dtype))
        local_num_params = tensor_2d_local_num_params(layer, rows, cols)
    # tensor and tensor2d: forward (allreduce_s) and backward collectives; vocab: its two all-reduces, summed above
    tp_comm_s = allreduce_s + backward_s
    recompute_s, offload_s = 0.0, 0.0
    if option.checkpoint == "full":
        kept = min(inputs, saved)
        recompute_s = fwd_s
        tp_comm_s += allreduce_s
    elif option.checkpoint == "selective":
        kept = min(saved, inputs + int(split(layer.matmul_saved_bytes, layer.tp_matmul_saved_bytes) * act_scale))
        recompute_s = fwd_memory_s
        tp_comm_s += recompute_comm_s
    else:
        kept = saved
    if option.offload_activations:
        offload_s = 2 * host_transfer_time_s(saved, cluster) if cluster.host_link else float("inf")
        kept = 0
    return OptionCost(compute_s=fwd_s + bwd_s, recompute_s=recompute_s, tp_communication_s=tp_comm_s,
                      offload_s=offload_s, activation_bytes=kept, working_bytes=saved - kept,
                      # norm parameters stay replicated under sequence parallelism: only units shard weights
                      local_num_params=local_num_params, backward_compute_s=bwd_s,
                      forward_s=fwd_s + allreduce_s + offload_s / 2)


def _vocab_communication_s(layer: LayerFacts, tp: int, bytes_scale: float, fwd_s: float, bwd_s: float,
                           cluster: Cluster) -> float:
    """Exposed seconds of a `vocab` layer's all-reduces over the contiguous tp group: the forward one (hidden
    behind the forward compute by the profile's tensor_parallel overlap) and the backward one (behind backward)."""
    group = list(range(tp))
    total_s = 0.0
    for num_bytes, window_s in ((layer.vocab_forward_allreduce_bytes, fwd_s),
                                (layer.vocab_backward_allreduce_bytes, bwd_s)):
        if num_bytes:
            total_s += exposed_time_s(all_reduce_time_s(num_bytes * bytes_scale, group, cluster), window_s,
                                      cluster.overlap.tensor_parallel)
    return total_s


def _compute_times_s(layer: LayerFacts, shard: int, batch_scale: float, bytes_scale: float, cluster: Cluster,
                     param_dtype: str, outside: int = 1) -> tuple[float, float, float]:
    """(forward, backward, forward non-matmul) seconds of the layer on one rank.

    Each traced op is priced alone on the profile's efficiency curves (the curves are indexed by one op's
    size) for its device time, and costs the host its per-op launch overhead to issue (the profile's
    dtensor_op_overhead instead for ops on DTensors, inside tensor-parallel units); ops inside units do
    1/shard of the work. Each phase's time is costmodel.issued_time_s of the two sums: the slower of host and
    device on CUDA (the host runs ahead of the stream), their sum on CPU processes. Layers
    without per-op facts (hand-built tables) are priced as one matmul and one memory-bound op per phase.
    """
    if not layer.ops:
        def split(total: float, in_units: float) -> float:
            return per_rank(total, in_units, shard, outside)

        fwd_memory_s = op_time_s(0.0, split(layer.fwd_bytes, layer.tp_fwd_bytes) * bytes_scale, cluster,
                                 param_dtype, is_matmul=False)
        fwd_s = op_time_s(split(layer.fwd_flops, layer.tp_fwd_flops) * batch_scale, 0.0, cluster,
                          param_dtype) + fwd_memory_s
        bwd_s = op_time_s(split(layer.bwd_flops, layer.tp_bwd_flops) * batch_scale, 0.0, cluster, param_dtype) \
            + op_time_s(0.0, split(layer.bwd_bytes, layer.tp_bwd_bytes) * bytes_scale, cluster, param_dtype,
                        is_matmul=False)
        return fwd_s, bwd_s, fwd_memory_s
    # device seconds and host (issue) seconds of the forward, the backward and the forward's non-matmul ops
    device = {"forward": 0.0, "backward": 0.0, "forward_memory": 0.0}
    host = dict(device)
    for op in layer.ops:
        divisor = shard if op.tensor_parallel else outside
        # activations inside tensor-parallel units (and, under sequence parallelism, around them) are DTensors,
        # whose dispatch per op replaces the plain op's overhead
        on_dtensors = shard > 1 and (op.tensor_parallel or outside > 1) and cluster.dtensor_op_overhead_s > 0
        moved = op.activation_bytes if op.is_matmul else op.bytes_accessed
        seconds = op_time_s(op.flops * batch_scale / divisor, moved * bytes_scale / divisor, cluster,
                            param_dtype, is_matmul=op.is_matmul)
        issue_s = (cluster.dtensor_op_overhead_s if on_dtensors else cluster.kernel_overhead_s) \
            * cluster.step_scale.host_overhead
        phases = [op.phase] + (["forward_memory"] if op.phase == "forward" and not op.is_matmul else [])
        for phase in phases:
            device[phase] += seconds
            host[phase] += issue_s
    forward_s, backward_s, forward_memory_s = (issued_time_s(device[p], host[p], cluster)
                                               for p in ("forward", "backward", "forward_memory"))
    return forward_s, backward_s, forward_memory_s
