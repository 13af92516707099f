"""Price one layer under one strategy on one mesh: time per step and memory per device.

Assumptions (the skeleton's; the cost-model issue refines them):
- Compute: matmul FLOPs at the roofline's matmul speed plus memory-bound traffic of other ops, summed.
- Tensor parallel: ops inside units run on 1/tp of the data; each unit all-reduces its row-linear output in
  forward and the column-linear input gradient in backward (Megatron's f/g), over the tp ranks (contiguous,
  inside a node).
- Data parallel is FSDP (ZeRO-3) over the dp ranks (strided by tp): parameters all-gathered for forward and
  again for backward, gradients reduce-scattered. No overlap with compute is assumed, so communication
  time is added to compute time: an upper bound.
- Memory: model states sharded by dp (and by tp for unit parameters); activations = what autograd saves
  (from the traced joint graph) scaled by micro-batch, divided by tp inside units.
"""

from __future__ import annotations

from dataclasses import dataclass

from costmodel import (
    Cluster,
    all_gather_time_s,
    all_reduce_time_s,
    model_state_bytes,
    op_time_s,
    reduce_scatter_time_s,
    sharded_model_state_bytes,
)
from planner.model_graph import LayerFacts


@dataclass(frozen=True)
class StrategyCost:
    """Predicted cost of one layer for one training step on one device."""

    compute_s: float
    communication_s: float
    parameters_bytes: int
    gradients_bytes: int
    optimizer_states_bytes: int
    activations_bytes: int
    unsharded_parameters_bytes: int
    """Parameter bytes this rank holds while FSDP has the layer gathered (the all-gather buffer)."""
    sharded_num_params: int
    """Parameters this rank owns and updates after tp and dp sharding (what its optimizer step touches)."""

    @property
    def time_s(self) -> float:
        return self.compute_s + self.communication_s

    @property
    def memory_bytes(self) -> int:
        return self.parameters_bytes + self.gradients_bytes + self.optimizer_states_bytes + self.activations_bytes


def tp_group(tp: int) -> list[int]:
    """Ranks of the first tensor-parallel group: contiguous, so it sits inside a node."""
    return list(range(tp))


def dp_group(dp: int, tp: int) -> list[int]:
    """Ranks of the first data-parallel group: one per tp block, strided by tp."""
    return [i * tp for i in range(dp)]


def layer_cost(layer: LayerFacts, strategy: str, dp: int, tp: int, batch_scale: float, cluster: Cluster,
               param_dtype: str = "float32") -> StrategyCost:
    """Cost of `layer` under `strategy` ("replicate" or "tensor") on a dp x tp mesh.

    batch_scale = per-rank micro-batch / traced sample batch; FLOPs, traffic and activations scale with it.
    """
    shard = tp if strategy == "tensor" else 1

    def split(total: float, in_units: float) -> float:
        return total - in_units + in_units / shard

    flops = split(layer.fwd_flops + layer.bwd_flops, layer.tp_fwd_flops + layer.tp_bwd_flops) * batch_scale
    moved = split(layer.fwd_bytes + layer.bwd_bytes, layer.tp_fwd_bytes + layer.tp_bwd_bytes) * batch_scale
    compute_s = op_time_s(flops, 0.0, cluster, param_dtype) + op_time_s(0.0, moved, cluster, param_dtype,
                                                                        is_matmul=False)
    local_params = int(split(layer.num_params, layer.tp_num_params))
    bytes_per_param = layer.param_bytes / layer.num_params if layer.num_params else 4.0
    local_param_bytes = local_params * bytes_per_param
    communication_s = 0.0
    if shard > 1:
        communication_s += 2 * all_reduce_time_s(layer.tp_allreduce_bytes * batch_scale, tp_group(tp), cluster)
    if dp > 1 and local_params:
        group = dp_group(dp, tp)
        communication_s += 2 * all_gather_time_s(local_param_bytes, group, cluster)
        communication_s += reduce_scatter_time_s(local_param_bytes, group, cluster)
    states = sharded_model_state_bytes(model_state_bytes(local_params, param_dtype, "adamw"), dp, zero_stage=3)
    activations = int(split(layer.saved_bytes, layer.tp_saved_bytes) * batch_scale)
    return StrategyCost(compute_s=compute_s, communication_s=communication_s,
                        parameters_bytes=states.parameters_bytes, gradients_bytes=states.gradients_bytes,
                        optimizer_states_bytes=states.optimizer_states_bytes, activations_bytes=activations,
                        unsharded_parameters_bytes=int(local_param_bytes),
                        sharded_num_params=-(-local_params // dp))
