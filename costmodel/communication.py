"""Time of collectives and point-to-point sends, by the alpha-beta model with ring algorithms.

For a group of n ranks on link (alpha = latency_s, B = bandwidth_bytes_per_s, the bus bandwidth one device
sees, as nccl-tests reports `busbw`):

    all_reduce      2(n-1) * alpha + 2(n-1)/n * message_bytes / B
    all_gather       (n-1) * alpha +  (n-1)/n * output_bytes  / B   (output = the full gathered tensor)
    reduce_scatter   (n-1) * alpha +  (n-1)/n * input_bytes   / B   (input  = the full unreduced tensor)
    point_to_point          alpha +             message_bytes / B

The link is `cluster.link_for(ranks)`: intra-node when the whole group is on one node, else inter-node.
A group of one rank costs 0.0 (no communication), as does a send from a rank to itself.

Blind spots: ring only (NCCL switches to trees for small messages and large n, where 2(n-1) * alpha
overestimates latency); a group spanning nodes is priced wholly at inter-node speed (no hierarchical
algorithm); no contention between concurrent collectives on different mesh axes; no overlap with compute
(callers decide how much overlap to assume).
"""

import math
from collections.abc import Sequence

from .cluster import Cluster

__all__ = ["all_gather_time_s", "all_reduce_time_s", "point_to_point_time_s", "reduce_scatter_time_s"]


def _check_bytes(field: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field} must be a number of bytes, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{field} must be a finite number of bytes >= 0, got {value!r}")
    return float(value)


def _group_size(ranks: Sequence[int]) -> int:
    if len(ranks) == 0:
        raise ValueError("a collective needs at least one rank, got an empty group")
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"ranks of a collective must be distinct, got {list(ranks)}")
    return len(ranks)


def _ring_time_s(steps_factor: int, volume_factor: float, message_bytes: float, ranks: Sequence[int],
                 cluster: Cluster) -> float:
    """steps_factor * (n-1) * alpha + volume_factor * (n-1)/n * bytes / B; 0.0 when n == 1."""
    n = _group_size(ranks)
    link = cluster.link_for(ranks)
    if n == 1:
        return 0.0
    return (steps_factor * (n - 1) * link.latency_s
            + volume_factor * (n - 1) / n * message_bytes / link.bandwidth_bytes_per_s)


def all_reduce_time_s(message_bytes: float, ranks: Sequence[int], cluster: Cluster) -> float:
    """Ring all-reduce of a `message_bytes` tensor: 2(n-1) * alpha + 2(n-1)/n * message_bytes / B."""
    return _ring_time_s(2, 2.0, _check_bytes("message_bytes", message_bytes), ranks, cluster)


def all_gather_time_s(output_bytes: float, ranks: Sequence[int], cluster: Cluster) -> float:
    """Ring all-gather into an `output_bytes` tensor: (n-1) * alpha + (n-1)/n * output_bytes / B."""
    return _ring_time_s(1, 1.0, _check_bytes("output_bytes", output_bytes), ranks, cluster)


def reduce_scatter_time_s(input_bytes: float, ranks: Sequence[int], cluster: Cluster) -> float:
    """Ring reduce-scatter of an `input_bytes` tensor: (n-1) * alpha + (n-1)/n * input_bytes / B."""
    return _ring_time_s(1, 1.0, _check_bytes("input_bytes", input_bytes), ranks, cluster)


def point_to_point_time_s(message_bytes: float, src: int, dst: int, cluster: Cluster) -> float:
    """One send of `message_bytes` from rank src to rank dst: alpha + message_bytes / B; 0.0 if src == dst."""
    message_bytes = _check_bytes("message_bytes", message_bytes)
    link = cluster.link_for([src, dst])
    if src == dst:
        return 0.0
    return link.latency_s + message_bytes / link.bandwidth_bytes_per_s
