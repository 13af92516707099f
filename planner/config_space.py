"""The configurations the search walks: mesh, micro-batching, pipeline schedule and data-parallel flavour.

A ParallelConfig fixes everything except the per-layer choices (tensor/replicate, checkpointing, offload)
and the pipeline cut, which the search optimises inside it. Enumeration order is fixed, so ties are broken
the same way every time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from planner.data_parallel_costs import DataParallelSetup

DATA_PARALLEL_KINDS = ("zero3", "zero2", "zero1", "ddp")
MAX_VIRTUAL_STAGES = 4


@dataclass(frozen=True)
class ParallelConfig:
    pp: int
    dp: int
    tp: int
    num_microbatches: int
    schedule: str
    virtual_stages: int
    dp_kind: str
    replicate: int
    param_dtype: str
    global_batch_size: int
    offload: bool = False
    """zero3 only: model states on the host (CPUOffloadPolicy)."""
    reduce_dtype: str = "float32"
    """Dtype of the data-parallel gradient reduction (the search keeps float32; a plan may say otherwise)."""

    @property
    def micro_batch_size(self) -> int:
        return self.global_batch_size // (self.dp * self.num_microbatches)

    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual_stages

    def data_parallel_setup(self) -> DataParallelSetup:
        return DataParallelSetup(kind=self.dp_kind, dp=self.dp, tp=self.tp, replicate=self.replicate,
                                 offload=self.offload, num_microbatches=self.num_microbatches,
                                 pipelined=self.pp > 1, param_dtype=self.param_dtype,
                                 reduce_dtype=self.reduce_dtype)

    @property
    def summary(self) -> str:
        schedule = "" if self.pp == 1 else f" {self.schedule}" + (
            f"(v={self.virtual_stages})" if self.virtual_stages > 1 else "")
        hsdp = (f" hsdp{self.replicate}" if self.replicate > 1 else "") + (" offload" if self.offload else "")
        return (f"pp{self.pp} dp{self.dp} tp{self.tp} {self.dp_kind}{hsdp}{schedule}, "
                f"{self.num_microbatches} micro-batches of {self.micro_batch_size}")


def _divisors(n: int) -> list[int]:
    """The divisors of n in increasing order, in O(sqrt n) steps (a world size of 10**9 takes ~3e4)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def enumerate_configs(world_size: int, devices_per_node: int, num_layers: int, global_batch_size: int,
                      param_dtype: str = "float32", mesh: tuple[int, int, int] | None = None,
                      max_microbatches: int | None = None, host_offload: bool = False) -> list[ParallelConfig]:
    """Every configuration worth pricing, in a fixed order.

    tp divides the world and fits in a node; pp cuts the chain into at most one layer per stage; dp divides
    the global batch; micro-batch counts divide the per-rank batch (at least pp of them for a pipeline, at most
    `max_microbatches` when given: published runs use hundreds); HSDP replicates across nodes when a
    data-parallel group spans several; with `host_offload` (the profile has a host link), zero3 without a
    pipeline may also keep model states on the host.
    """
    configs = []
    meshes = [mesh] if mesh else [(pp, world_size // (pp * tp), tp)
                                  for tp in _divisors(world_size) if tp <= devices_per_node
                                  for pp in _divisors(world_size // tp)]
    for pp, dp, tp in meshes:
        if pp > num_layers or global_batch_size % dp:
            continue
        nodes_spanned = max(1, (dp * tp) // devices_per_node)
        replicas = [1] + ([nodes_spanned] if nodes_spanned > 1 and dp % nodes_spanned == 0 else [])
        for m in _divisors(global_batch_size // dp):
            if (max_microbatches is not None and m > max_microbatches) or (pp > 1 and m < pp):
                continue
            schedules = [("none", 1)] if pp == 1 else [("1f1b", 1), ("gpipe", 1)] + [
                ("interleaved_1f1b", v) for v in range(2, MAX_VIRTUAL_STAGES + 1)
                if pp * v <= num_layers and m % pp == 0]
            for schedule, v in schedules:
                for kind in DATA_PARALLEL_KINDS:
                    for replicate in replicas:
                        if dp == 1 and (kind != "ddp" or replicate > 1):
                            continue  # nothing to shard over: one flavour is enough
                        if replicate > 1 and kind == "ddp":
                            continue
                        offloads = [False, True] if host_offload and kind == "zero3" and pp == 1 else [False]
                        configs.extend(ParallelConfig(pp, dp, tp, m, schedule, v, kind, replicate, param_dtype,
                                                      global_batch_size, offload) for offload in offloads)
    return configs
