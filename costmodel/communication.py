"""Time of collectives and point-to-point sends by the alpha-beta model, and how much of it is exposed.

Within one link level, for a group of n ranks (alpha = latency_s, B = bandwidth_bytes_per_s, the bus
bandwidth one device sees, as nccl-tests reports `busbw`), ring algorithms give:

    all_reduce      2(n-1) * alpha + 2(n-1)/n * message_bytes / B
    all_gather       (n-1) * alpha +  (n-1)/n * output_bytes  / B   (output = the full gathered tensor)
    reduce_scatter   (n-1) * alpha +  (n-1)/n * input_bytes   / B   (input  = the full unreduced tensor)
    all_to_all       (n-1) * alpha +  (n-1)/n * message_bytes / B   (pairwise exchange; message = one rank's
                                                                    whole send buffer)
    point_to_point          alpha +             message_bytes / B

Groups that span nodes (ranks node-major, `Cluster.node_of`): one ring over all n ranks on the inter-node
link, whatever the layout: every rank's share of the message crosses its own NIC at the inter-node (alpha, B),
so all_reduce = 2(n-1) alpha_inter + 2(n-1)/n M / B_inter and the others likewise. Calculon (Isaev et al.,
SC'23) prices a collective spanning nodes the same way (on the slowest network it touches), and it is what the
published runs say: DeepSpeed ZeRO-3 at 768 and 1,536 A100s (Narayanan et al. 2021 Table 2) takes the same
66.75 s a step, the per-rank volume at the NIC rate, where a two-level model (RS inside nodes, 1/g of the
bytes across them) prices it 4-8x faster (benchmarks/published_runs.py). Blind spot: NCCL's multi-rail
rings can beat this inside fabrics where every GPU of a node drives its own NIC in parallel rings.
- all_to_all across nodes: (n-1) inter-node latencies, and the intra-node and inter-node shares of the
  message sent at the same time: max((g-1)/n * M / B_intra, (n-g)/n * M / B_inter).

Each level's (alpha, B) is `cluster.link(level, collective)`: a per-collective override when calibrate
measured one, else the level's link. A group of one rank costs 0.0, as does a send from a rank to itself.

Blind spots: ring latency (n-1) alpha everywhere; NCCL's trees give ~log2(n) alpha for small messages on
large groups, so latency-bound collectives on many ranks are overestimated; no contention between
concurrent collectives on different mesh axes; overlap with compute is applied separately
(`exposed_time_s`, costmodel/overlap.py).
"""

import math
from collections import Counter
from collections.abc import Sequence

from .cluster import Cluster, LinkSpec

__all__ = [
    "all_gather_time_s",
    "all_reduce_time_s",
    "all_to_all_time_s",
    "exposed_time_s",
    "point_to_point_time_s",
    "reduce_scatter_time_s",
]


def _check_bytes(field: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field} must be a number of bytes, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{field} must be a finite number of bytes >= 0, got {value!r}")
    return float(value)


def _layout(ranks: Sequence[int], cluster: Cluster) -> tuple[int, int, bool]:
    """(n ranks, k nodes, uniform: the same number of ranks on every node of the group)."""
    return _layout_of(tuple(ranks), cluster)


def _layout_of(ranks: tuple[int, ...], cluster: Cluster) -> tuple[int, int, bool]:
    # the planner prices the same few groups (up to thousands of ranks) tens of thousands of times a plan
    key = (ranks, cluster.devices_per_node, cluster.world_size)
    if key not in _LAYOUTS:
        if len(ranks) == 0:
            raise ValueError("a collective needs at least one rank, got an empty group")
        if len(set(ranks)) != len(ranks):
            raise ValueError(f"ranks of a collective must be distinct, got {list(ranks)}")
        per_node = Counter(cluster.node_of(rank) for rank in ranks)
        if len(_LAYOUTS) >= _LAYOUT_CACHE_SIZE:
            _LAYOUTS.clear()
        _LAYOUTS[key] = len(ranks), len(per_node), len(set(per_node.values())) == 1
    return _LAYOUTS[key]


_LAYOUT_CACHE_SIZE = 4096
_LAYOUTS: dict[tuple[tuple[int, ...], int, int], tuple[int, int, bool]] = {}


def _ring_s(n: int, steps_factor: int, volume_factor: float, num_bytes: float, link: LinkSpec) -> float:
    """steps_factor * (n-1) * alpha + volume_factor * (n-1)/n * bytes / B; 0.0 when n == 1."""
    if n == 1:
        return 0.0
    latency_s = steps_factor * (n - 1) * link.latency_s
    return latency_s + volume_factor * (n - 1) / n * num_bytes / link.bandwidth_bytes_per_s


def _link_level(ranks: Sequence[int], cluster: Cluster) -> str:
    """"intra_node" when the group sits on one node, else "inter_node" (the module docstring's one ring)."""
    _, k, _ = _layout(ranks, cluster)
    return "intra_node" if k == 1 else "inter_node"


def _half_collective_s(collective: str, num_bytes: float, ranks: Sequence[int], cluster: Cluster) -> float:
    """all_gather (output bytes) or reduce_scatter (input bytes): one ring on the slowest level the group spans."""
    return _ring_s(len(ranks), 1, 1.0, num_bytes, cluster.link(_link_level(ranks, cluster), collective))


def all_reduce_time_s(message_bytes: float, ranks: Sequence[int], cluster: Cluster) -> float:
    """All-reduce of a `message_bytes` tensor over `ranks` (seconds): 2(n-1) alpha + 2(n-1)/n M / B on the
    slowest level the group spans (one node: intra_node; several: inter_node), with the all_reduce links."""
    message_bytes = _check_bytes("message_bytes", message_bytes)
    return _ring_s(len(ranks), 2, 2.0, message_bytes, cluster.link(_link_level(ranks, cluster), "all_reduce"))


def all_gather_time_s(output_bytes: float, ranks: Sequence[int], cluster: Cluster) -> float:
    """All-gather into an `output_bytes` tensor (seconds): (n-1) alpha + (n-1)/n * output_bytes / B on the
    slowest level the group spans."""
    return _half_collective_s("all_gather", _check_bytes("output_bytes", output_bytes), ranks, cluster)


def reduce_scatter_time_s(input_bytes: float, ranks: Sequence[int], cluster: Cluster) -> float:
    """Reduce-scatter of an `input_bytes` tensor (seconds): (n-1) alpha + (n-1)/n * input_bytes / B on the
    slowest level the group spans."""
    return _half_collective_s("reduce_scatter", _check_bytes("input_bytes", input_bytes), ranks, cluster)


def all_to_all_time_s(message_bytes: float, ranks: Sequence[int], cluster: Cluster) -> float:
    """All-to-all where each rank sends `message_bytes` in total, 1/n to every rank (itself included), seconds.

    One node: (n-1) alpha + (n-1)/n M / B. Across nodes (g = ranks on the sender's node, taken as n/k):
    (n-1) alpha_inter + max((g-1)/n M / B_intra, (n-g)/n M / B_inter). Blind spot: uneven layouts use n/k.
    """
    message_bytes = _check_bytes("message_bytes", message_bytes)
    n, k, _ = _layout(ranks, cluster)
    if n == 1:
        return 0.0
    intra = cluster.link("intra_node", "all_to_all")
    if k == 1:
        return _ring_s(n, 1, 1.0, message_bytes, intra)
    inter = cluster.link("inter_node", "all_to_all")
    g = n / k
    return ((n - 1) * inter.latency_s + max((g - 1) / n * message_bytes / intra.bandwidth_bytes_per_s,
                                            (n - g) / n * message_bytes / inter.bandwidth_bytes_per_s))


def point_to_point_time_s(message_bytes: float, src: int, dst: int, cluster: Cluster) -> float:
    """One send of `message_bytes` from rank src to rank dst: alpha + message_bytes / B on the level that joins
    them (seconds); 0.0 if src == dst. Blind spot: no rendezvous/handshake cost beyond alpha."""
    message_bytes = _check_bytes("message_bytes", message_bytes)
    link = cluster.link_for([src, dst], "point_to_point")
    if src == dst:
        return 0.0
    return link.latency_s + message_bytes / link.bandwidth_bytes_per_s


def exposed_time_s(comm_s: float, compute_s: float, overlap: float) -> float:
    """Communication time left on the critical path when a fraction `overlap` of it can run under compute.

    exposed = comm_s - overlap * min(comm_s, compute_s)   (seconds)

    Assumption: the overlappable share of the communication runs concurrently with the `compute_s` window it
    is issued beside (e.g. the next layer's all-gather under this layer's compute) and cannot hide behind
    more compute than there is; the rest is serial. overlap 0 gives comm_s (the skeleton's upper bound),
    overlap 1 gives max(0, comm_s - compute_s). Blind spot: the slowdown compute suffers from sharing
    memory bandwidth or SMs with communication kernels is not modelled.
    """
    comm_s = _check_bytes("comm_s", comm_s)
    compute_s = _check_bytes("compute_s", compute_s)
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap <= 1:
        raise ValueError(f"overlap must be a fraction in [0, 1], got {overlap!r}")
    return comm_s - overlap * min(comm_s, compute_s)
