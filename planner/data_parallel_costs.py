"""Model-state memory and data-parallel communication of one device under ddp / ZeRO-1/2/3 and HSDP.

These follow what the runtime does (runtime/data_parallel.py), not the ideal ZeRO paper:
- ddp: everything replicated; gradients all-reduced once per step, by DDP's buckets during the backward of the
  last micro-batch only (pp = 1: gradient sync on the last micro-batch; under a pipeline,
  torch.distributed.pipelining runs every other forward and backward under `no_sync()`), so the reduction can
  hide under one micro-batch's backward, not m of them.
- zero1: optimizer states sharded (over dp / replicate ranks); gradients all-reduced as ddp, updated parameters
  all-gathered. Under a pipeline both are per stage over the stage's dp group, with the same volume and memory.
- zero2: FSDP2 `fully_shard(reshard_after_forward=False)`: parameters gathered once per micro-batch and kept
  until backward ends, gradients reduce-scattered, optimizer states sharded. Peak parameter memory is the
  full (tensor-parallel-local) size.
- zero3: FSDP2 `fully_shard`: parameters gathered for forward and again for backward, per micro-batch;
  only the largest layer is gathered at once. Under a pipeline, torch.distributed.pipelining turns off
  resharding after every backward but the last (`set_reshard_after_backward(False)`), so after the first
  backward the stage holds its parameters gathered like zero2, while each forward still reshards: one gather
  for the first forward and one per backward, m + 1 per step (counted in tests/test_fsdp_gathers.py).
  Under a pipeline zero3 therefore costs zero2's memory and more gathers; the search prices it so.
- Gradient accumulation (more than one micro-batch) with zero2/zero3 accumulates unsharded gradients and
  reduce-scatters once at the end (FSDP2 `set_requires_gradient_sync(False)` until the last micro-batch).
- HSDP: sharded over groups of dp / replicate ranks, gradients then all-reduced across the replicas.
- offload (zero3): parameters, gradients and optimizer states live on the host; they cross the host link once
  per step (parameters up, gradients down) and the device only holds gathered layers.
Mixed precision keeps a float32 master copy (2 + 2 + 12 bytes per parameter for AdamW, ZeRO paper).
Blind spots: gradient bucketing and allocator fragmentation; the optimizer step of offloaded states runs on
the host and is priced at device speed.
"""

from __future__ import annotations

from dataclasses import dataclass

from costmodel import (
    Cluster,
    ModelStateBytes,
    all_gather_time_s,
    all_reduce_time_s,
    dtype_bytes,
    host_transfer_time_s,
    model_state_bytes,
    reduce_scatter_time_s,
    sharded_model_state_bytes,
)

ZERO_STAGE = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}


@dataclass(frozen=True)
class DataParallelSetup:
    """Everything about the data-parallel axis that prices model states and their communication."""

    kind: str
    dp: int
    tp: int
    replicate: int = 1
    offload: bool = False
    num_microbatches: int = 1
    pipelined: bool = False
    param_dtype: str = "float32"
    reduce_dtype: str = "float32"

    @property
    def shard_degree(self) -> int:
        return self.dp // self.replicate

    @property
    def keeps_parameters_gathered(self) -> bool:
        return self.kind == "zero2" or (self.kind == "zero3" and self.pipelined)


def rank_state_bytes(local_num_params: int, setup: DataParallelSetup) -> ModelStateBytes:
    """Parameters, gradients and optimizer states on one device at their peak during a step."""
    mixed = setup.param_dtype != "float32"
    full = model_state_bytes(local_num_params, setup.param_dtype, "adamw", master_weights=mixed)
    if setup.offload:
        return ModelStateBytes(0, 0, 0)
    sharded = sharded_model_state_bytes(full, setup.shard_degree, ZERO_STAGE[setup.kind])
    parameters = full.parameters_bytes if setup.keeps_parameters_gathered else sharded.parameters_bytes
    accumulates = setup.num_microbatches > 1 and setup.kind in ("zero2", "zero3")
    gradients = full.gradients_bytes if accumulates else sharded.gradients_bytes
    return ModelStateBytes(parameters, gradients, sharded.optimizer_states_bytes)


def gathered_buffer_bytes(largest_layer_local_params: int, setup: DataParallelSetup) -> int:
    """zero3 (not kept gathered): one layer's full parameters while it runs; nothing for the other kinds."""
    if setup.kind != "zero3" or setup.keeps_parameters_gathered or setup.shard_degree == 1:
        return 0
    return largest_layer_local_params * dtype_bytes(setup.param_dtype)


def parameter_gathers_per_step(setup: DataParallelSetup) -> int:
    """All-gathers of one FSDP2 group's parameters per optimizer step (zero2 / zero3; see the module docstring).

    zero2: once per micro-batch (gathered for forward, kept through backward, resharded after it), and once
    per step under a pipeline (kept across micro-batches). zero3: forward and backward of every micro-batch,
    2m; under a pipeline m + 1 (every forward reshards, only the last backward does).
    """
    m = setup.num_microbatches
    if setup.kind == "zero2":
        return 1 if setup.pipelined else m
    if setup.kind == "zero3":
        return m + 1 if setup.pipelined else 2 * m
    return 0


def data_parallel_time_s(local_num_params: int, setup: DataParallelSetup, cluster: Cluster) -> tuple[float, float]:
    """(gather_s, reduce_s): parameter all-gathers and gradient reductions of one device per step.

    Group layout: ranks are row-major over (pp, dp, tp), so data-parallel peers are strided by tp; an HSDP
    shard group is dp / replicate consecutive dp indices and the replica group strides over shard groups.
    """
    if setup.dp == 1 or local_num_params == 0:
        return 0.0, 0.0
    param_bytes = local_num_params * dtype_bytes(setup.param_dtype)
    grad_bytes = local_num_params * dtype_bytes(setup.reduce_dtype)
    shard_group = [d * setup.tp for d in range(setup.shard_degree)]
    replica_group = [r * setup.shard_degree * setup.tp for r in range(setup.replicate)]
    gather_s = reduce_s = 0.0
    if setup.kind == "ddp":
        reduce_s = all_reduce_time_s(grad_bytes, shard_group, cluster)
    elif setup.kind == "zero1":
        reduce_s = all_reduce_time_s(grad_bytes, shard_group, cluster)
        gather_s = all_gather_time_s(param_bytes, shard_group, cluster)
    else:
        gather_s = parameter_gathers_per_step(setup) * all_gather_time_s(param_bytes, shard_group, cluster)
        reduce_s = reduce_scatter_time_s(grad_bytes, shard_group, cluster)
    if setup.replicate > 1:
        reduce_s += all_reduce_time_s(grad_bytes / setup.shard_degree, replica_group, cluster)
    return gather_s, reduce_s


def offload_time_s(local_num_params: int, setup: DataParallelSetup, cluster: Cluster) -> float:
    """Host<->device traffic of offloaded model states per step: parameter shards up, gradient shards down."""
    if not setup.offload:
        return 0.0
    if cluster.host_link is None:
        return float("inf")
    shard = -(-local_num_params // setup.shard_degree)
    return (host_transfer_time_s(shard * dtype_bytes(setup.param_dtype), cluster)
            + host_transfer_time_s(shard * dtype_bytes(setup.reduce_dtype), cluster))
