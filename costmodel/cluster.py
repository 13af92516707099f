"""Cluster profiles: what one device and each link level can do, read from and written to YAML.

Vocabulary: a *node* is one host; devices on the same node talk over the *intra-node* link (NVLink, or shared
memory for CPU processes); devices on different nodes talk over the *inter-node* link (InfiniBand,
Ethernet); the *host link* joins a device to its host's memory (PCIe / NVLink-C2C; offload uses it). Ranks
are numbered node-major, as torchrun numbers them: rank r lives on node r // devices_per_node.

In memory every number is in base units (bytes, seconds, FLOP/s, bytes/s) and the field name says which.
The YAML form uses human units and its keys say them too (`device_memory_gib`, `peak_tflops`,
`bandwidth_gb_per_s`, `latency_us`), with GB = 1e9 bytes and GiB = 2**30 bytes. costmodel/PROFILE.md lists
every YAML field with its unit.

Efficiency curves: achieved share of peak depends on problem size (a 64x64 matmul reaches a few percent of a
GPU's peak, a 8192^3 one 70-80 %). A curve is a list of [size, efficiency] points (size in FLOPs for
matmuls, in bytes moved for memory-bound ops), interpolated linearly in log10(size) and held flat beyond
the first and last points. A single number is a flat curve (what schema version 1 profiles had).

No hardware number lives in this file: presets are YAML files in `costmodel/presets/` (shipped as package
data), and `meshplan calibrate` measures the machine it runs on and writes a profile. Only `yaml.safe_load`
reads YAML, so tags such as `!!python/object` are refused.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

import yaml

from .bounded_yaml import brief, load_bounded, read_bounded_text
from .dtypes import SUPPORTED_DTYPES, normalize_dtype_name

SCHEMA_VERSION = 2
"""The cluster YAML schema version this code writes. Version 1 files (scalar `matmul_efficiency`, no curves,
overlap, launch overhead or host link) are still read: see `Cluster.from_dict`."""

READABLE_SCHEMA_VERSIONS = (1, 2)

OVERLAP_KINDS = ("fsdp_all_gather", "gradient_reduction", "pipeline_p2p", "tensor_parallel")
"""Communication kinds whose overlap with compute a profile states (0 = fully exposed, 1 = fully hidden)."""

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "point_to_point")
LINK_LEVELS = ("intra_node", "inter_node")

DEVICE_TYPES = ("cpu", "cuda")
BACKENDS = ("gloo", "nccl")

# Unit conversions between the YAML form and base units (definitions of units, not hardware numbers).
_GIB = 2**30
_GB = 1e9
_TERA = 1e12
_US_PER_S = 1e6

_LINK_KEYS = ("bandwidth_gb_per_s", "latency_us")
_REQUIRED_KEYS = (
    "schema_version",
    "name",
    "device_type",
    "backend",
    "num_nodes",
    "devices_per_node",
    "device_memory_gib",
    "usable_memory_fraction",
    "peak_tflops",
    "matmul_efficiency",
    "memory_bandwidth_gb_per_s",
    "intra_node",
    "inter_node",
)
_OPTIONAL_KEYS = ("description",)
_V2_REQUIRED_KEYS = (*_REQUIRED_KEYS, "memory_efficiency", "kernel_overhead_us", "overlap")
_V2_OPTIONAL_KEYS = ("description", "host_link", "collectives", "optimizer_tensor_overhead_us",
                     "dtensor_op_overhead_us", "step_scale")


class ClusterError(ValueError):
    """A cluster profile is malformed or missing; the message names the source, the field and the fix."""


# ----------------------------------------------------------------------------------------------------------
# Field checks shared by the dataclasses (base units) and by from_dict (human units).


def _fail(source: str, field: str, requirement: str, value: object) -> NoReturn:
    raise ClusterError(f"cluster {brief(source)}: field {brief(field)} must be {requirement}, got {brief(value)}")


def _check_int(source: str, field: str, value: object) -> int:
    """A positive integer; bools are refused although Python counts them as ints."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(source, field, "a positive integer", value)
    return value


MAX_MAGNITUDE = 1e12
"""Largest number a cluster field may hold in its own unit (GiB, TFLOPS, GB/s, us): beyond it products overflow."""
MIN_MAGNITUDE = 1e-9
"""Smallest non-zero number a cluster field may hold: a smaller rate or efficiency makes every time infinite."""


def _check_number(source: str, field: str, value: object, kind: str = "positive", human: bool = False) -> float:
    """A finite real number; kind is "positive" (> 0), "non-negative" (>= 0) or "fraction" (in (0, 1]).

    `human`: a value in a profile's own units (GiB, TFLOPS, GB/s, us, fractions), which must also lie within
    MIN_MAGNITUDE .. MAX_MAGNITUDE (or be 0 where 0 is allowed)."""
    requirement = {
        "positive": "a number > 0",
        "non-negative": "a number >= 0",
        "fraction": "a number in (0, 1]",
    }[kind]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(source, field, requirement, value)
    try:
        value = float(value)  # an integer beyond float range overflows here
    except OverflowError:
        _fail(source, field, f"{requirement} and at most {MAX_MAGNITUDE:g}", value)
    if not math.isfinite(value):
        _fail(source, field, requirement, value)
    ok = {"positive": value > 0, "non-negative": value >= 0, "fraction": 0 < value <= 1}[kind]
    if not ok:
        _fail(source, field, requirement, value)
    if human and value > MAX_MAGNITUDE:
        _fail(source, field, f"{requirement} and at most {MAX_MAGNITUDE:g} (in the unit its name says); larger "
              "values overflow the cost model's arithmetic", value)
    if human and value and value < MIN_MAGNITUDE:
        _fail(source, field, f"0 or at least {MIN_MAGNITUDE:g} (in the unit its name says): with a rate or an "
              "efficiency this small every predicted time would be infinite, which is why no plan could fit",
              value)
    return value


def _check_text(source: str, field: str, value: object, choices: Sequence[str] = ()) -> str:
    if not isinstance(value, str) or not value.strip():
        _fail(source, field, "a non-empty string", value)
    if choices and value not in choices:
        _fail(source, field, f"one of {', '.join(repr(c) for c in choices)}", value)
    return value


def _check_backend(source: str, device_type: str, backend: str) -> None:
    if device_type == "cpu" and backend == "nccl":
        _fail(source, "backend", "'gloo' when device_type is 'cpu' (NCCL needs CUDA devices)", backend)


def _check_peak_keys(source: str, field: str, table: Mapping[Any, Any]) -> None:
    for key in table:
        if key not in SUPPORTED_DTYPES:
            _fail(source, f"{field}.{key}", f"a torch dtype name, one of {', '.join(SUPPORTED_DTYPES)}", key)
    if "float32" not in table:
        raise ClusterError(
            f"cluster {source!r}: field {field!r} must have a 'float32' entry "
            f"(it is the fallback for dtypes without their own peak), got keys {sorted(table)}"
        )


def _check_keys(source: str, prefix: str, data: Mapping[Any, Any], required: Sequence[str],
                optional: Sequence[str] = ()) -> None:
    allowed = (*required, *optional)
    for key in data:
        if key not in allowed:
            raise ClusterError(
                f"cluster {source!r}: unknown field {brief(prefix + str(key), 60)}; remove it or fix the spelling "
                f"(allowed: {', '.join(allowed)})"
            )
    for key in required:
        if key not in data:
            raise ClusterError(
                f"cluster {source!r}: missing field {prefix + key!r}; add it "
                f"(see costmodel/presets/a100-80g.yaml for a complete profile)"
            )


def _check_mapping(source: str, field: str, value: object) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        _fail(source, field, "a mapping", value)
    return value


def _to_base(human: float, scale: float, inverse: bool = False) -> float:
    """Human units to base units: human * scale, or human / scale when inverse (microseconds -> seconds)."""
    return human / scale if inverse else human * scale


def _to_human(base: float, scale: float, inverse: bool = False) -> float | int:
    """Base units to human units, nudged by at most a few ulps so that `_to_base` gives `base` back exactly.

    Integral results come back as int so the YAML reads `80`, not `80.0`.
    """
    first = base * scale if inverse else base / scale
    for candidate in (first, *_neighbours(first, steps=4)):
        if _to_base(candidate, scale, inverse) == base:
            first = candidate
            break
    if first.is_integer() and abs(first) < 2**53:
        return int(first)
    return first


def _neighbours(value: float, steps: int) -> list[float]:
    """The `steps` floats just above and just below `value`, nearest first."""
    up, down, found = value, value, []
    for _ in range(steps):
        up, down = math.nextafter(up, math.inf), math.nextafter(down, -math.inf)
        found += [up, down]
    return found


# ----------------------------------------------------------------------------------------------------------
# The profile types.


@dataclass(frozen=True)
class EfficiencyCurve:
    """Achieved fraction of peak as a function of problem size, by piecewise-linear interpolation in log10(size).

    `points` are (size, efficiency) pairs with strictly increasing size > 0 and efficiency in (0, 1]. Below the
    first point the first efficiency holds, above the last the last one (no extrapolation). One point is a
    flat curve. Size is FLOPs for matmul curves and bytes moved for memory-bound curves.
    """

    points: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "points", _check_curve("<EfficiencyCurve>", "points", self.points))

    @classmethod
    def flat(cls, efficiency: float) -> EfficiencyCurve:
        """The same efficiency at every size (a v1 profile's scalar)."""
        return cls(((1.0, efficiency),))

    def at(self, size: float) -> float:
        """Efficiency at `size` (FLOPs or bytes): log-linear between points, clamped outside them."""
        points = self.points
        if size <= points[0][0]:
            return points[0][1]
        if size >= points[-1][0]:
            return points[-1][1]
        x = math.log10(size)
        for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
            if size <= x1:
                lx0, lx1 = math.log10(x0), math.log10(x1)
                return y0 + (y1 - y0) * (x - lx0) / (lx1 - lx0)
        return points[-1][1]  # unreachable: size < last point's size

    def to_list(self) -> list[list[float]]:
        return [[_plain(x), _plain(y)] for x, y in self.points]


def _plain(value: float) -> float | int:
    return int(value) if float(value).is_integer() and abs(value) < 2**53 else float(value)


def _check_curve(source: str, field: str, value: object) -> tuple[tuple[float, float], ...]:
    """A number (flat curve) or a non-empty list of [size, efficiency] pairs with increasing size."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return ((1.0, _check_number(source, field, value, "fraction", human=True)),)
    if not isinstance(value, (list, tuple)) or not value:
        _fail(source, field, "an efficiency in (0, 1] or a list of [size, efficiency] pairs", value)
    points = []
    for i, pair in enumerate(value):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            _fail(source, f"{field}[{i}]", "a [size, efficiency] pair", pair)
        size = _check_number(source, f"{field}[{i}][0]", pair[0])
        efficiency = _check_number(source, f"{field}[{i}][1]", pair[1], "fraction", human=True)
        if points and size <= points[-1][0]:
            _fail(source, f"{field}[{i}][0]", f"larger than the previous size {points[-1][0]!r} "
                  "(sort the points by size, no repeats)", pair[0])
        points.append((size, efficiency))
    return tuple(points)


@dataclass(frozen=True)
class LinkSpec:
    """One link level (intra-node, inter-node, host) in the alpha-beta model: time = alpha + bytes / beta."""

    bandwidth_bytes_per_s: float
    """Bus bandwidth one device sees for collectives on this level (bytes/s), as nccl-tests reports `busbw`.
    Ring formulas divide by it after scaling bytes by the algorithm factor, e.g. 2(n-1)/n for all-reduce."""

    latency_s: float
    """Per-message latency, alpha (seconds); one ring step costs this much however small the message."""

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "bandwidth_bytes_per_s",
            _check_number("<LinkSpec>", "bandwidth_bytes_per_s", self.bandwidth_bytes_per_s),
        )
        object.__setattr__(
            self, "latency_s", _check_number("<LinkSpec>", "latency_s", self.latency_s, "non-negative")
        )


@dataclass(frozen=True)
class OverlapSpec:
    """Share of each kind of communication hidden behind compute, in [0, 1] (0 = fully exposed, 1 = hidden).

    Applied by `costmodel.communication.exposed_time_s` (exposed = comm - fraction * min(comm, compute)) for
    pipeline sends and tensor-parallel collectives, and by `costmodel.overlap.data_parallel_exposed_s` for a
    layer's data-parallel gathers and reductions, which share one window of its compute.
    These are properties of the runtime and hardware together (separate copy engines / SMs for NCCL on GPUs;
    one shared core pool for gloo on CPUs), so they live in the profile, not in code.
    """

    fsdp_all_gather: float = 0.0
    """FSDP/ZeRO-3 parameter all-gathers prefetched while the previous layer computes."""
    gradient_reduction: float = 0.0
    """Gradient reduce-scatter / all-reduce (DDP buckets, FSDP) running while backward continues."""
    pipeline_p2p: float = 0.0
    """Pipeline activation/gradient sends between stages overlapping with the next micro-batch."""
    tensor_parallel: float = 0.0
    """Tensor-parallel all-reduces (Megatron f/g); usually 0: they sit on the critical path."""

    def __post_init__(self) -> None:
        for name in OVERLAP_KINDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                _fail("<OverlapSpec>", name, "a number in [0, 1]", value)
            object.__setattr__(self, name, float(value))


STEP_SCALE_KINDS = ("compute", "host_overhead", "communication", "optimizer")
"""Step-level terms a profile may scale (`StepScale`), fitted from measured runs by `calibrate --from-runs`."""


@dataclass(frozen=True)
class StepScale:
    """Multipliers on the time terms of a training step, each > 0 (1 = the profile's numbers as they are).

    What a micro-benchmark calibration cannot see and a whole step shows: the same ops run slower inside a
    training step than alone in a loop (caches shared with other layers, allocator, hooks of FSDP2 / DTensor /
    pipelining between ops, a core shared with other ranks). `meshplan calibrate --from-runs` fits them by least
    squares over measured runs (meshplan/tune.py). Applied by the formulas that read the profile:
    """

    compute: float = 1.0
    """Device time of every op (the roofline term of `costmodel.compute.op_time_s`)."""
    host_overhead: float = 1.0
    """Per-op host time: kernel_overhead_s and dtensor_op_overhead_s."""
    communication: float = 1.0
    """Every collective and send (`Cluster.link` scales latency up and bandwidth down by it)."""
    optimizer: float = 1.0
    """The optimizer step (`costmodel.compute.optimizer_step_time_s`)."""

    def __post_init__(self) -> None:
        for name in STEP_SCALE_KINDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                _fail("<StepScale>", name, "a finite number > 0", value)
            object.__setattr__(self, name, float(value))

    @property
    def is_identity(self) -> bool:
        return all(getattr(self, name) == 1.0 for name in STEP_SCALE_KINDS)


@dataclass(frozen=True)
class Cluster:
    """A homogeneous cluster: `num_nodes` hosts with `devices_per_node` identical devices each.

    Blind spots: one device type only; one bandwidth per link level and collective (no topology inside a
    node, no oversubscribed fabric, no contention between concurrent collectives); efficiency curves are
    indexed by FLOPs or bytes alone (not by shape or layout); one fixed launch overhead per op.
    """

    name: str
    """Short identifier, e.g. "a100-80g"; presets are named after their file."""

    device_type: str
    """"cpu" or "cuda"."""

    backend: str
    """torch.distributed backend: "gloo" or "nccl" ("nccl" requires device_type "cuda")."""

    num_nodes: int
    """Number of hosts (>= 1)."""

    devices_per_node: int
    """Devices (GPUs, or CPU processes) per host (>= 1)."""

    device_memory_bytes: int
    """Memory of one device in bytes (GiB * 2**30 in the YAML)."""

    usable_memory_fraction: float
    """Share of device memory the planner may fill, in (0, 1]; the rest covers allocator reserve,
    fragmentation and the runtime context (CUDA context, NCCL buffers)."""

    peak_flops_per_s: dict[str, float]
    """Peak FLOP/s of one device by torch dtype name ("float32", "bfloat16", ...); "float32" is required
    and is the fallback for dtypes not listed."""

    matmul_efficiency: dict[str, EfficiencyCurve]
    """Achieved share of peak for matmul-class ops by dtype, as a curve over the op's FLOPs; "float32" is
    required and is the fallback. A plain number (or a curve) given here is applied to every dtype."""

    memory_bandwidth_bytes_per_s: float
    """Device memory bandwidth (bytes/s, datasheet or measured copy) that bounds memory-bound ops."""

    intra_node: LinkSpec
    """Link between devices on one node."""

    inter_node: LinkSpec
    """Link between devices on different nodes (per device: one NIC per GPU in the GPU presets)."""

    description: str = ""
    """Free text for people: what hardware this is and where the numbers come from. Not used in costs."""

    memory_efficiency: EfficiencyCurve = EfficiencyCurve(((1.0, 1.0),))
    """Achieved share of memory_bandwidth for memory-bound ops, as a curve over bytes moved by the op."""

    kernel_overhead_s: float = 0.0
    """Fixed time per aten op of a training step (seconds) on top of the roofline: kernel launch on GPUs,
    dispatcher, autograd and nn.Module overhead everywhere. `calibrate` measures it as the time per op of an
    eager forward + backward of tiny layers, where the arithmetic is negligible."""

    dtensor_op_overhead_s: float = 0.0
    """Fixed time per aten op of a training step that runs on DTensors (tensor-parallel regions), instead of
    kernel_overhead_s: DTensor's sharding propagation and dispatch in Python. `calibrate` measures it with a
    tiny forward + backward on replicated DTensors (no communication). 0 = use kernel_overhead_s."""

    optimizer_tensor_overhead_s: float = 0.0
    """Fixed time per parameter tensor of the optimizer step (seconds), beyond its memory traffic: torch's
    per-tensor loop (or foreach launches) over DTensor parameters as FSDP2 holds them. `calibrate` measures it
    with AdamW on tiny sharded parameters. 0 when unknown."""

    host_link: LinkSpec | None = None
    """Device <-> host memory link (PCIe, NVLink-C2C) per device, for offload; None = unknown, and
    `host_transfer_time_s` then refuses with the fix."""

    collective_links: dict[str, dict[str, LinkSpec]] = field(default_factory=dict)
    """Optional per-collective overrides: level ("intra_node"/"inter_node") -> collective name -> LinkSpec,
    e.g. what calibrate fitted for all_gather alone. Missing entries use the level's LinkSpec."""

    overlap: OverlapSpec = OverlapSpec()
    """How much of each kind of communication hides behind compute."""

    step_scale: StepScale = StepScale()
    """Step-level multipliers fitted from measured runs (`StepScale`); all 1 unless a profile says otherwise."""

    def __post_init__(self) -> None:
        source = self.name if isinstance(self.name, str) and self.name else "<Cluster>"
        _check_text(source, "name", self.name)
        _check_text(source, "device_type", self.device_type, DEVICE_TYPES)
        _check_text(source, "backend", self.backend, BACKENDS)
        _check_backend(source, self.device_type, self.backend)
        _check_int(source, "num_nodes", self.num_nodes)
        _check_int(source, "devices_per_node", self.devices_per_node)
        _check_int(source, "device_memory_bytes", self.device_memory_bytes)
        for name, kind in (("usable_memory_fraction", "fraction"), ("memory_bandwidth_bytes_per_s", "positive"),
                           ("kernel_overhead_s", "non-negative"), ("optimizer_tensor_overhead_s", "non-negative"),
                           ("dtensor_op_overhead_s", "non-negative")):
            object.__setattr__(self, name, _check_number(source, name, getattr(self, name), kind))
        peak = _check_mapping(source, "peak_flops_per_s", self.peak_flops_per_s)
        _check_peak_keys(source, "peak_flops_per_s", peak)
        # A private copy, so the frozen object cannot change through the caller's dict.
        peak = {k: _check_number(source, f"peak_flops_per_s.{k}", v) for k, v in peak.items()}
        object.__setattr__(self, "peak_flops_per_s", peak)
        object.__setattr__(self, "matmul_efficiency", _normalize_matmul_curves(source, self.matmul_efficiency))
        if not isinstance(self.memory_efficiency, EfficiencyCurve):
            object.__setattr__(self, "memory_efficiency", EfficiencyCurve(
                _check_curve(source, "memory_efficiency", self.memory_efficiency)))
        for name in ("intra_node", "inter_node"):
            if not isinstance(getattr(self, name), LinkSpec):
                _fail(source, name, "a LinkSpec", getattr(self, name))
        if self.host_link is not None and not isinstance(self.host_link, LinkSpec):
            _fail(source, "host_link", "a LinkSpec or None", self.host_link)
        links = _check_mapping(source, "collective_links", self.collective_links)
        copied: dict[str, dict[str, LinkSpec]] = {}
        for level, table in links.items():
            if level not in LINK_LEVELS:
                _fail(source, f"collective_links.{level}", f"a level, one of {', '.join(LINK_LEVELS)}", level)
            for collective, link in _check_mapping(source, f"collective_links.{level}", table).items():
                if collective not in COLLECTIVES or not isinstance(link, LinkSpec):
                    _fail(source, f"collective_links.{level}.{collective}",
                          f"a LinkSpec under a collective name ({', '.join(COLLECTIVES)})", link)
            copied[level] = dict(table)
        object.__setattr__(self, "collective_links", copied)
        if not isinstance(self.overlap, OverlapSpec):
            _fail(source, "overlap", "an OverlapSpec", self.overlap)
        if not isinstance(self.description, str):
            _fail(source, "description", "a string", self.description)
        if not isinstance(self.step_scale, StepScale):
            _fail(source, "step_scale", "a StepScale", self.step_scale)

    def __hash__(self) -> int:  # the dict fields would make the generated hash fail
        links = tuple(sorted((lv, tuple(sorted(t.items()))) for lv, t in self.collective_links.items()))
        return hash((self.name, self.device_type, self.backend, self.num_nodes, self.devices_per_node,
                     self.device_memory_bytes, self.usable_memory_fraction,
                     tuple(sorted(self.peak_flops_per_s.items())), tuple(sorted(self.matmul_efficiency.items())),
                     self.memory_bandwidth_bytes_per_s, self.intra_node, self.inter_node, self.description,
                     self.memory_efficiency, self.kernel_overhead_s, self.optimizer_tensor_overhead_s,
                     self.dtensor_op_overhead_s,
                     self.host_link, links, self.overlap, self.step_scale))

    @property
    def world_size(self) -> int:
        """Number of devices: num_nodes * devices_per_node."""
        return self.num_nodes * self.devices_per_node

    @property
    def usable_memory_bytes(self) -> int:
        """Bytes per device the planner may fill: floor(device_memory_bytes * usable_memory_fraction)."""
        return int(self.device_memory_bytes * self.usable_memory_fraction)

    def matmul_efficiency_at(self, flops: float, dtype: str = "float32") -> float:
        """Matmul efficiency for an op of `flops` FLOPs in `dtype` (float32's curve when dtype has none)."""
        curves = self.matmul_efficiency
        return curves.get(normalize_dtype_name(dtype), curves["float32"]).at(flops)

    def for_world_size(self, world_size: int) -> Cluster:
        """A copy with num_nodes = ceil(world_size / devices_per_node).

        The copy's `world_size` is rounded up to whole nodes (4 ranks on 8-device nodes keep one full node);
        ranks 0..world_size-1 then sit on nodes exactly as torchrun places them.
        """
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ClusterError(
                f"cluster {self.name!r}: world_size must be a positive integer, got {world_size!r}"
            )
        return dataclasses.replace(self, num_nodes=math.ceil(world_size / self.devices_per_node))

    def node_of(self, rank: int) -> int:
        """The node that holds `rank`: rank // devices_per_node. ValueError for a rank outside the cluster."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ValueError(
                f"rank {rank!r} is outside cluster {self.name!r} of {self.world_size} devices "
                f"({self.num_nodes} node(s) x {self.devices_per_node}); "
                f"use cluster.for_world_size(n) to size it for n ranks"
            )
        return rank // self.devices_per_node

    def link(self, level: str, collective: str | None = None) -> LinkSpec:
        """The LinkSpec of `level` ("intra_node"/"inter_node"), or its override for `collective` if any."""
        if level not in LINK_LEVELS:
            raise ValueError(f"link level must be one of {', '.join(LINK_LEVELS)}, got {level!r}")
        override = self.collective_links.get(level, {}).get(collective) if collective else None
        link = override or getattr(self, level)
        scale = self.step_scale.communication
        if scale == 1.0:
            return link
        return LinkSpec(link.bandwidth_bytes_per_s / scale, link.latency_s * scale)

    def link_for(self, ranks: Sequence[int], collective: str | None = None) -> LinkSpec:
        """intra_node when every rank of the group is on one node, else inter_node (the slowest level).

        `collective` picks a per-collective override when the profile has one. Hierarchical pricing of
        groups that span nodes lives in `costmodel.communication`, which uses `link` per level.
        """
        if len(ranks) == 0:
            raise ValueError("link_for needs at least one rank, got an empty group")
        nodes = {self.node_of(rank) for rank in ranks}
        return self.link("intra_node" if len(nodes) == 1 else "inter_node", collective)

    def to_dict(self) -> dict[str, Any]:
        """The YAML form (schema version 2): human units named in the keys. `from_dict` inverts it."""
        data: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "name": self.name}
        if self.description:
            data["description"] = self.description
        data.update(
            device_type=self.device_type,
            backend=self.backend,
            num_nodes=self.num_nodes,
            devices_per_node=self.devices_per_node,
            device_memory_gib=_to_human(self.device_memory_bytes, _GIB),
            usable_memory_fraction=self.usable_memory_fraction,
            peak_tflops={k: _to_human(v, _TERA) for k, v in self.peak_flops_per_s.items()},
            matmul_efficiency={k: c.to_list() for k, c in self.matmul_efficiency.items()},
            memory_bandwidth_gb_per_s=_to_human(self.memory_bandwidth_bytes_per_s, _GB),
            memory_efficiency=self.memory_efficiency.to_list(),
            kernel_overhead_us=_to_human(self.kernel_overhead_s, _US_PER_S, inverse=True),
            optimizer_tensor_overhead_us=_to_human(self.optimizer_tensor_overhead_s, _US_PER_S, inverse=True),
            dtensor_op_overhead_us=_to_human(self.dtensor_op_overhead_s, _US_PER_S, inverse=True),
            intra_node=_link_to_dict(self.intra_node),
            inter_node=_link_to_dict(self.inter_node),
        )
        if self.host_link is not None:
            data["host_link"] = _link_to_dict(self.host_link)
        if self.collective_links:
            data["collectives"] = {level: {c: _link_to_dict(link) for c, link in table.items()}
                                   for level, table in self.collective_links.items()}
        data["overlap"] = {name: getattr(self.overlap, name) for name in OVERLAP_KINDS}
        if not self.step_scale.is_identity:
            data["step_scale"] = {name: getattr(self.step_scale, name) for name in STEP_SCALE_KINDS}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> Cluster:
        """Build a Cluster from its YAML form, refusing unknown or missing keys, wrong types (bools are not
        numbers), non-positive sizes and fractions outside (0, 1]. Errors are ClusterError naming `source`
        and the field.

        Schema version 1 (the first profiles: scalar `matmul_efficiency`, none of memory_efficiency,
        kernel_overhead_us, host_link, collectives, overlap) still loads: its scalar becomes a flat curve,
        memory efficiency is 1, launch overhead 0, host link unknown and no overlap is assumed.
        """
        data = _check_mapping(source, "<top level>", data)
        version = data.get("schema_version")
        if isinstance(version, bool) or version not in READABLE_SCHEMA_VERSIONS:
            _fail(source, "schema_version", f"one of {READABLE_SCHEMA_VERSIONS} (the versions meshplan reads; "
                  f"it writes {SCHEMA_VERSION})", version)
        if version == 1:
            _check_keys(source, "", data, _REQUIRED_KEYS, _OPTIONAL_KEYS)
        else:
            _check_keys(source, "", data, _V2_REQUIRED_KEYS, _V2_OPTIONAL_KEYS)
        name = _check_text(source, "name", data["name"])
        description = data.get("description", "")
        if not isinstance(description, str):
            _fail(source, "description", "a string (free text)", description)
        device_type = _check_text(source, "device_type", data["device_type"], DEVICE_TYPES)
        backend = _check_text(source, "backend", data["backend"], BACKENDS)
        _check_backend(source, device_type, backend)
        memory_gib = _check_number(source, "device_memory_gib", data["device_memory_gib"], human=True)
        memory_bytes = round(_to_base(memory_gib, _GIB))
        if memory_bytes < 1:
            _fail(source, "device_memory_gib", "at least one byte", data["device_memory_gib"])
        peak = _check_mapping(source, "peak_tflops", data["peak_tflops"])
        _check_peak_keys(source, "peak_tflops", peak)
        extra: dict[str, Any] = {}
        if version == 2:
            extra = dict(
                memory_efficiency=EfficiencyCurve(_check_curve(source, "memory_efficiency",
                                                               data["memory_efficiency"])),
                kernel_overhead_s=_to_base(_check_number(source, "kernel_overhead_us", data["kernel_overhead_us"],
                                                         "non-negative", human=True), _US_PER_S, inverse=True),
                optimizer_tensor_overhead_s=_to_base(_check_number(
                    source, "optimizer_tensor_overhead_us", data.get("optimizer_tensor_overhead_us", 0),
                    "non-negative"), _US_PER_S, inverse=True),
                dtensor_op_overhead_s=_to_base(_check_number(
                    source, "dtensor_op_overhead_us", data.get("dtensor_op_overhead_us", 0), "non-negative"),
                    _US_PER_S, inverse=True),
                overlap=_overlap_from_dict(source, data["overlap"]),
                collective_links=_collectives_from_dict(source, data.get("collectives", {})),
                step_scale=_step_scale_from_dict(source, data.get("step_scale", {})),
            )
            if data.get("host_link") is not None:
                extra["host_link"] = _link_from_dict(source, "host_link", data["host_link"])
        return cls(
            name=name,
            device_type=device_type,
            backend=backend,
            num_nodes=_check_int(source, "num_nodes", data["num_nodes"]),
            devices_per_node=_check_int(source, "devices_per_node", data["devices_per_node"]),
            device_memory_bytes=memory_bytes,
            usable_memory_fraction=_check_number(
                source, "usable_memory_fraction", data["usable_memory_fraction"], "fraction"
            ),
            peak_flops_per_s={
                k: _to_base(_check_number(source, f"peak_tflops.{k}", v, human=True), _TERA) for k, v in peak.items()
            },
            matmul_efficiency=_matmul_curves_from_dict(source, data["matmul_efficiency"]),
            memory_bandwidth_bytes_per_s=_to_base(
                _check_number(source, "memory_bandwidth_gb_per_s", data["memory_bandwidth_gb_per_s"], human=True), _GB
            ),
            intra_node=_link_from_dict(source, "intra_node", data["intra_node"]),
            inter_node=_link_from_dict(source, "inter_node", data["inter_node"]),
            description=description,
            **extra,
        )


def _normalize_matmul_curves(source: str, value: object) -> dict[str, EfficiencyCurve]:
    """A number, an EfficiencyCurve or a list of points (one curve for every dtype), or dtype -> any of those."""
    if isinstance(value, EfficiencyCurve):
        return {"float32": value}
    if not isinstance(value, Mapping):
        return {"float32": EfficiencyCurve(_check_curve(source, "matmul_efficiency", value))}
    _check_peak_keys(source, "matmul_efficiency", value)
    return {k: v if isinstance(v, EfficiencyCurve) else EfficiencyCurve(_check_curve(
        source, f"matmul_efficiency.{k}", v)) for k, v in value.items()}


def _matmul_curves_from_dict(source: str, value: object) -> dict[str, EfficiencyCurve]:
    if isinstance(value, Mapping):
        _check_peak_keys(source, "matmul_efficiency", value)
        return {k: EfficiencyCurve(_check_curve(source, f"matmul_efficiency.{k}", v)) for k, v in value.items()}
    return {"float32": EfficiencyCurve(_check_curve(source, "matmul_efficiency", value))}


def _overlap_from_dict(source: str, value: object) -> OverlapSpec:
    data = _check_mapping(source, "overlap", value)
    _check_keys(source, "overlap.", data, OVERLAP_KINDS)
    fractions = {}
    for name in OVERLAP_KINDS:
        number = data[name]
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0 <= number <= 1:
            _fail(source, f"overlap.{name}", "a number in [0, 1] (0 = no overlap, 1 = fully hidden)", number)
        fractions[name] = float(number)
    return OverlapSpec(**fractions)


def _step_scale_from_dict(source: str, value: object) -> StepScale:
    data = _check_mapping(source, "step_scale", value)
    _check_keys(source, "step_scale.", data, (), STEP_SCALE_KINDS)
    scales = {}
    for name, number in data.items():
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) \
                or number <= 0:
            _fail(source, f"step_scale.{name}", "a number > 0 (1 = unscaled)", number)
        scales[name] = float(number)
    return StepScale(**scales)


def _collectives_from_dict(source: str, value: object) -> dict[str, dict[str, LinkSpec]]:
    data = _check_mapping(source, "collectives", value)
    _check_keys(source, "collectives.", data, (), LINK_LEVELS)
    result = {}
    for level, table in data.items():
        table = _check_mapping(source, f"collectives.{level}", table)
        _check_keys(source, f"collectives.{level}.", table, (), COLLECTIVES)
        result[level] = {c: _link_from_dict(source, f"collectives.{level}.{c}", link) for c, link in table.items()}
    return result


def _link_to_dict(link: LinkSpec) -> dict[str, float | int]:
    return {
        "bandwidth_gb_per_s": _to_human(link.bandwidth_bytes_per_s, _GB),
        "latency_us": _to_human(link.latency_s, _US_PER_S, inverse=True),
    }


def _link_from_dict(source: str, field: str, value: object) -> LinkSpec:
    data = _check_mapping(source, field, value)
    _check_keys(source, f"{field}.", data, _LINK_KEYS)
    bandwidth = _check_number(source, f"{field}.bandwidth_gb_per_s", data["bandwidth_gb_per_s"], human=True)
    latency = _check_number(source, f"{field}.latency_us", data["latency_us"], "non-negative", human=True)
    return LinkSpec(bandwidth_bytes_per_s=_to_base(bandwidth, _GB),
                    latency_s=_to_base(latency, _US_PER_S, inverse=True))


# ----------------------------------------------------------------------------------------------------------
# Files and presets.


def _presets_dir() -> Any:
    return resources.files(__package__) / "presets"


def list_presets() -> list[str]:
    """Names of the shipped presets (files costmodel/presets/<name>.yaml), sorted."""
    return sorted(p.name.removesuffix(".yaml") for p in _presets_dir().iterdir() if p.name.endswith(".yaml"))


def _parse(text: str, source: str) -> Cluster:
    try:
        data = load_bounded(text, "cluster file")
    except yaml.YAMLError as err:
        message = str(err) if len(str(err)) <= 1500 else str(err)[:1500] + "..."
        raise ClusterError(
            f"cluster {source!r}: not valid YAML (or uses a tag safe_load refuses): {message}"
        ) from err
    if not isinstance(data, Mapping):
        raise ClusterError(
            f"cluster {source!r}: the top level must be a mapping of field: value, got {type(data).__name__}"
        )
    return Cluster.from_dict(data, source=source)


def load_cluster(name_or_path: str | os.PathLike[str]) -> Cluster:
    """Load a preset by name ("a100-80g") or a profile YAML file by path.

    A string counts as a path when it names an existing file, ends in .yaml/.yml, or contains a path
    separator; otherwise it is a preset name, and an unknown one raises ClusterError listing the presets.
    """
    text = os.fspath(name_or_path)
    looks_like_path = (
        isinstance(name_or_path, os.PathLike) or text.endswith((".yaml", ".yml")) or os.sep in text
        or "/" in text or os.path.isfile(text)
    )
    if looks_like_path:
        path = Path(text)
        try:
            content = read_bounded_text(path, "cluster file")
        except yaml.YAMLError as err:
            raise ClusterError(f"cluster {text!r}: {err}") from err
        except OSError as err:
            raise ClusterError(
                f"cluster {text!r}: cannot read the file ({err.strerror}); check the path"
            ) from err
        except UnicodeDecodeError as err:
            raise ClusterError(
                f"cluster {text!r}: not a text (UTF-8) file, so not a cluster YAML ({err.reason} at byte "
                f"{err.start})"
            ) from err
        return _parse(content, text)
    presets = list_presets()
    if text not in presets:
        raise ClusterError(
            f"unknown cluster preset {text!r}; presets: {', '.join(presets)} "
            f"(or pass the path of a cluster YAML file, e.g. one written by `meshplan calibrate`)"
        )
    resource = _presets_dir() / f"{text}.yaml"
    return _parse(resource.read_text(encoding="utf-8"), f"{text}.yaml")


def save_cluster(cluster: Cluster, path: str | os.PathLike[str]) -> None:
    """Write `cluster` as YAML (its `to_dict` form) to `path`, overwriting it; `load_cluster` reads it."""
    body = yaml.safe_dump(cluster.to_dict(), sort_keys=False, default_flow_style=None, allow_unicode=True)
    header = "# meshplan cluster profile; units are in the key names (GB = 1e9 bytes, GiB = 2**30 bytes)\n"
    Path(path).write_text(header + body, encoding="utf-8")
