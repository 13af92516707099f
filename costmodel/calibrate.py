"""`meshplan calibrate`: measure the machine this runs on and write a cluster profile YAML.

    meshplan calibrate --out cluster.yaml [--base PRESET] [--nproc-per-node N] [--quick]
    python -m costmodel.calibrate --out cluster.yaml          (the same, without the meshplan package)

Run it under torchrun on the cluster (`torchrun --nnodes=2 --nproc-per-node=8 ... -m costmodel.calibrate
--out cluster.yaml` on every node); outside torchrun it starts `python -m torch.distributed.run --standalone
--nproc-per-node=N` on this host itself (N = number of GPUs, or 2 CPU processes). Every rank measures at the
same time, so the numbers include the contention a training job sees (on CPU the ranks share cores).

What it measures, per rank, then combines over ranks (the slowest rank's time counts):
- matmul efficiency curve per dtype: time of n x n @ n x n for a few n; FLOPs = 2 n^3. On CUDA the peak stays
  the base profile's (datasheet) and efficiency = achieved / peak; on CPU there is no datasheet peak, so the
  peak becomes the best achieved rate and the curve is relative to it.
- per-op overhead of a training step: time per aten op of an eager forward + backward of tiny layers
  (launch, dispatcher, autograd, nn.Module calls); the same on replicated DTensors (what ops inside
  tensor-parallel units pay); and AdamW's time per parameter tensor on tiny DTensor parameters (FSDP2 holds
  parameters as DTensors).
- memory bandwidth and its curve: dst.copy_(src) of several sizes, 2 x size bytes moved; the largest copy sets
  memory_bandwidth_gb_per_s, smaller ones the efficiency curve. The bare dispatch time of one op (a
  one-element add) is subtracted from every timed matmul and copy before computing efficiencies, because
  the cost model adds a per-op overhead back.
- host <-> device bandwidth (CUDA: pinned host -> device copy; CPU: the memory copy bandwidth).
- device memory (CUDA: total memory; CPU: total RAM / devices_per_node of the base profile).
- all_reduce, all_gather and reduce_scatter latency and bandwidth per link level: time over several message
  sizes, fit time = a + b * bytes by least squares (torch.linalg.lstsq), and turn (a, b) into the ring
  model's alpha and bus bandwidth (for all_reduce a = 2(n-1) alpha, b = 2(n-1) / (n B)). Intra-node uses one
  group per node; inter-node (multi-node jobs only) one group per local rank across nodes.
Kept from the base profile: usable_memory_fraction, overlap fractions, inter-node links on a single node.

Blind spots: square matmuls only (skinny shapes are slower at equal FLOPs); one process per device; the fit
assumes the alpha-beta model holds over the sizes measured (gloo switches algorithms by size).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode

from .cluster import Cluster, ClusterError, EfficiencyCurve, LinkSpec, StepScale, load_cluster, save_cluster
from .progress import ENV as PROGRESS_ENV
from .progress import Progress
from .rank_environment import rank_import_environment

_QUICK = {"matmul_sizes": (32, 128, 384), "copy_mib": (0.0625, 1, 16), "message_kib": (4, 64, 512, 2048),
          "repeats": 3, "min_time_s": 0.02}
_FULL = {"matmul_sizes": (64, 128, 256, 512, 1024, 2048), "copy_mib": (0.0625, 1, 16, 64),
         "message_kib": (4, 64, 512, 2048, 8192, 32768), "repeats": 5, "min_time_s": 0.1}
_IN_RUN = {"matmul_sizes": (32, 128, 256), "copy_mib": (0.0625, 1, 8), "message_kib": (4, 64, 512),
           "repeats": 5, "min_time_s": 0.01, "statistic": "median"}
"""What `execute` measures inside a CPU run after its training steps (`measure_in_run`): a second or two, in the
ranks' own processes, so the numbers carry the core sharing the run had. The median of the repeats, not the
minimum: the step time the run reports is a median under the same contention."""
_CUDA_EXTRA_SIZES = (4096, 8192)
_COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter")


@dataclass
class LinkFit:
    """A fitted alpha-beta line for one collective on one level."""

    collective: str
    group_size: int
    intercept_s: float
    """The least-squares intercept a (may be negative on noisy data; `link` has the guarded value)."""
    seconds_per_byte: float
    link: LinkSpec


# ----------------------------------------------------------------------------------------------------------
# Timing.


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call_s(fn: Callable[[], object], device: torch.device, repeats: int, min_time_s: float,
                statistic: str = "min") -> float:
    """Fastest over `repeats` of the mean time of one call, each repeat looping long enough to last min_time_s.

    The minimum, as `timeit` recommends: on a shared host the slower repeats measure other processes.
    statistic="median" takes the median repeat instead (what a run sharing the host with them sees)."""
    fn()
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    single = max(time.perf_counter() - start, 1e-7)
    loops = max(1, min(10_000, int(min_time_s / single)))
    samples = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        _synchronize(device)
        samples.append((time.perf_counter() - start) / loops)
    return statistics.median(samples) if statistic == "median" else min(samples)


def _slowest_rank_s(seconds: float, device: torch.device, group=None) -> float:
    """The largest of every rank's `seconds` (all ranks of `group` call this together)."""
    if not dist.is_initialized():
        return seconds
    value = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return float(value.item())


# ----------------------------------------------------------------------------------------------------------
# Measurements.


class _CountOps(TorchDispatchMode):
    """Counts the aten ops that reach the dispatcher's kernels."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def measure_kernel_overhead_s(device: torch.device, settings: dict) -> float:
    """Time per aten op of an eager forward + backward through tiny Linear / GELU / LayerNorm layers.

    At width 16 the arithmetic is negligible, so this is the fixed cost every op of a training step pays:
    kernel launch, dispatcher, autograd bookkeeping and nn.Module call overhead. It is what a planner's
    per-op overhead must cover; a bare `torch.add` of one element measures only part of it."""
    width = 16
    layers = [nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width)) for _ in range(8)]
    model = nn.Sequential(*layers).to(device)
    x = torch.randn(4, width, device=device)

    def step():
        model(x).sum().backward()

    step()
    counter = _CountOps()
    with counter:
        step()
    seconds = time_call_s(step, device, settings["repeats"], settings["min_time_s"],
                       settings.get("statistic", "min"))
    return seconds / max(counter.count, 1)


def measure_dtensor_op_overhead_s(device: torch.device, settings: dict) -> float:
    """Time per aten op of the same tiny forward + backward as measure_kernel_overhead_s, with parameters and
    input as replicated DTensors on the whole world (no communication): DTensor's per-op sharding
    propagation and dispatch, what tensor-parallel regions pay for every op."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    width = 16
    plain = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))
                            for _ in range(8)]).to(device)
    x = torch.randn(4, width, device=device)
    counter = _CountOps()
    with counter:
        plain(x).sum().backward()
    model = distribute_module(plain, mesh)
    x_dtensor = distribute_tensor(x, mesh, [Replicate()])

    def step():
        model(x_dtensor).sum().backward()

    seconds = time_call_s(step, device, settings["repeats"], settings["min_time_s"],
                       settings.get("statistic", "min"))
    return seconds / max(counter.count, 1)


def measure_optimizer_tensor_overhead_s(device: torch.device, settings: dict) -> float:
    """Time per parameter tensor of torch's default AdamW step over tiny DTensor parameters sharded on the
    whole world, as FSDP2 holds them (memory traffic is negligible at this size)."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    num_tensors = 32
    params = []
    for _ in range(num_tensors):
        param = nn.Parameter(distribute_tensor(torch.zeros(dist.get_world_size() * 4, 4, device=device), mesh,
                                               [Shard(0)]))
        param.grad = distribute_tensor(torch.ones(dist.get_world_size() * 4, 4, device=device), mesh, [Shard(0)])
        params.append(param)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    seconds = time_call_s(optimizer.step, device, settings["repeats"], settings["min_time_s"],
                       settings.get("statistic", "min"))
    return seconds / num_tensors


def measure_matmul_s(n: int, dtype: torch.dtype, device: torch.device, settings: dict) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return time_call_s(lambda: torch.mm(a, b), device, settings["repeats"], settings["min_time_s"],
                       settings.get("statistic", "min"))


def measure_copy_s(num_bytes: int, device: torch.device, settings: dict) -> float:
    numel = max(1, num_bytes // 4)
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    return time_call_s(lambda: dst.copy_(src), device, settings["repeats"], settings["min_time_s"],
                       settings.get("statistic", "min"))


def measure_host_copy_s(num_bytes: int, device: torch.device, settings: dict) -> float:
    """Host (pinned) -> device copy time on CUDA."""
    numel = max(1, num_bytes // 4)
    host = torch.ones(numel).pin_memory()
    dst = torch.empty(numel, device=device)
    return time_call_s(lambda: dst.copy_(host, non_blocking=True), device, settings["repeats"], settings["min_time_s"],
                       settings.get("statistic", "min"))


def measure_collective_s(collective: str, message_bytes: int, group, group_size: int, device: torch.device,
                         settings: dict) -> float:
    """Time of one collective whose 'message' is the all_reduce tensor, the all_gather output or the
    reduce_scatter input, of `message_bytes` bytes."""
    numel = max(group_size, message_bytes // 4 // group_size * group_size)
    if collective == "all_reduce":
        tensor = torch.ones(numel, device=device)

        def call():
            dist.all_reduce(tensor, group=group)
    elif collective == "all_gather":
        shard = torch.ones(numel // group_size, device=device)
        output = torch.empty(numel, device=device)

        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.12

        def call():
            gather(output, shard, group=group)
    else:
        full = torch.ones(numel, device=device)
        shard = torch.empty(numel // group_size, device=device)

        scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

        def call():
            scatter(shard, full, group=group)
    dist.barrier(group=group)
    # the loop count must agree across ranks, so every rank uses the first rank's single-call time
    call()
    _synchronize(device)
    start = time.perf_counter()
    call()
    _synchronize(device)
    single = _slowest_rank_s(time.perf_counter() - start, device, group)
    loops = max(1, min(1000, int(settings["min_time_s"] / max(single, 1e-7))))
    samples = []
    for _ in range(settings["repeats"]):
        dist.barrier(group=group)
        start = time.perf_counter()
        for _ in range(loops):
            call()
        _synchronize(device)
        samples.append((time.perf_counter() - start) / loops)
    return _slowest_rank_s(statistics.median(samples), device, group)


def fit_alpha_beta(collective: str, group_size: int, message_bytes: Sequence[float],
                   times_s: Sequence[float]) -> LinkFit:
    """Least-squares fit of time = a + b * bytes, turned into the ring model's (alpha, bus bandwidth).

    The fit minimises relative error (each row weighted by 1 / time), so the latency-bound small messages
    that FSDP and tensor parallelism send for small layers count as much as the bandwidth-bound large ones.

    all_reduce: a = 2(n-1) alpha, b = 2(n-1)/(n B); all_gather / reduce_scatter: a = (n-1) alpha,
    b = (n-1)/(n B). Noise guards: a non-positive slope falls back to the largest message's average rate; a
    non-positive intercept is re-estimated from the smallest message (its time less its bandwidth part, at
    least half its time), since no collective is free.
    """
    n = group_size
    x = torch.tensor([[1.0 / t, float(m) / t] for m, t in zip(message_bytes, times_s, strict=True)],
                     dtype=torch.float64)
    y = torch.ones(len(times_s), 1, dtype=torch.float64)
    solution = torch.linalg.lstsq(x, y).solution.flatten().tolist()
    intercept, slope = solution
    fitted_intercept, fitted_slope = intercept, slope
    steps, volume = (2, 2.0) if collective == "all_reduce" else (1, 1.0)
    if slope <= 0:
        slope = max(times_s[-1] - max(intercept, 0.0), 1e-12) / message_bytes[-1]
    if intercept <= 0:
        intercept = max(times_s[0] - slope * message_bytes[0], times_s[0] / 2)
    alpha = intercept / (steps * (n - 1))
    bandwidth = volume * (n - 1) / n / slope
    return LinkFit(collective, n, fitted_intercept, fitted_slope, LinkSpec(bandwidth, alpha))


def _log_curve(points: list[tuple[float, float]]) -> EfficiencyCurve:
    """Points sorted by size, efficiencies clamped into (0, 1], repeated sizes dropped."""
    cleaned: list[tuple[float, float]] = []
    for size, efficiency in sorted(points):
        if cleaned and size <= cleaned[-1][0]:
            continue
        cleaned.append((float(size), float(min(1.0, max(efficiency, 1e-4)))))
    return EfficiencyCurve(tuple(cleaned))


def _rounded(value: float, digits: int = 4) -> float:
    """`digits` significant digits, so the YAML stays readable."""
    if value == 0 or not math.isfinite(value):
        return value
    return float(f"{value:.{digits}g}")


# ----------------------------------------------------------------------------------------------------------
# The whole calibration on this rank.


def default_base(device: torch.device) -> str:
    """The preset to start from: "cpu", or the GPU preset whose name matches this device."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for key, preset in (("h200", "h200"), ("h100", "h100"), ("l40s", "l40s")):
        if key in name:
            return preset
    if "a100" in name:
        return "a100-40g" if torch.cuda.get_device_properties(device).total_memory < 60 * 2**30 else "a100-80g"
    return "a100-80g"


def calibrate_rank(base: Cluster, device: torch.device, quick: bool, name: str,
                   settings: dict | None = None) -> tuple[Cluster, list[str]]:
    """Measure on every rank (process group initialised, or world size 1) and return the new profile and the
    summary lines. Every rank returns the same profile. `settings` replaces the quick / full sizes."""
    settings = dict(settings if settings is not None else _QUICK if quick else _FULL)
    if device.type == "cuda" and not quick:
        settings["matmul_sizes"] = (*settings["matmul_sizes"], *_CUDA_EXTRA_SIZES)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    num_nodes = max(1, world // local_world)
    dtypes = [torch.float32, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    collective_levels = []
    if world > 1:
        collective_levels.append("intra_node")
        if num_nodes > 1:
            collective_levels.append("inter_node")
    total = (3 + len(dtypes) * len(settings["matmul_sizes"]) + len(settings["copy_mib"])
             + (1 if device.type == "cuda" else 0)
             + len(collective_levels) * len(_COLLECTIVES) * len(settings["message_kib"]))
    progress = Progress("calibrate", total, enabled=rank == 0)
    lines: list[str] = []

    one = torch.ones(1, device=device)
    bare_s = _slowest_rank_s(time_call_s(lambda: torch.add(one, one), device, settings["repeats"],
                                         settings["min_time_s"], settings.get("statistic", "min")), device)
    overhead_s = _slowest_rank_s(measure_kernel_overhead_s(device, settings), device)
    progress.step("per-op overhead (tiny training step)")
    optimizer_overhead_s = _slowest_rank_s(measure_optimizer_tensor_overhead_s(device, settings), device)
    progress.step("optimizer per-tensor overhead")
    dtensor_overhead_s = _slowest_rank_s(measure_dtensor_op_overhead_s(device, settings), device)
    progress.step("DTensor per-op overhead")

    peaks = dict(base.peak_flops_per_s)
    curves = {}
    for dtype in dtypes:
        dtype_name = str(dtype).removeprefix("torch.")
        rates = []
        for n in settings["matmul_sizes"]:
            seconds = _slowest_rank_s(measure_matmul_s(n, dtype, device, settings), device)
            flops = 2.0 * n**3
            rates.append((flops, flops / max(seconds - bare_s, seconds * 0.05)))
            progress.step(f"matmul {dtype_name} n={n}")
        best = max(rate for _, rate in rates)
        if device.type != "cuda" or best > peaks.get(dtype_name, 0.0):
            peaks[dtype_name] = _rounded(best)  # CPU: no datasheet peak; GPU: TF32 or boost beat the sheet
        peak = peaks[dtype_name]
        curves[dtype_name] = _log_curve([(f, _rounded(r / peak)) for f, r in rates])
        lines.append(f"matmul {dtype_name:<9} peak {peak / 1e12:8.3f} TFLOP/s   efficiency "
                     + ", ".join(f"{f:.0e}:{e:.2f}" for f, e in curves[dtype_name].points))
    if "float32" not in curves:
        curves["float32"] = base.matmul_efficiency["float32"]

    copy_rates = []
    for mib in settings["copy_mib"]:
        num_bytes = int(mib * 2**20)
        seconds = _slowest_rank_s(measure_copy_s(num_bytes, device, settings), device)
        copy_rates.append((2.0 * num_bytes, 2.0 * num_bytes / max(seconds - bare_s, seconds * 0.05)))
        progress.step(f"copy {mib:g} MiB")
    bandwidth = _rounded(copy_rates[-1][1])
    memory_curve = _log_curve([(b, _rounded(r / bandwidth)) for b, r in copy_rates])
    lines.append(f"memory    bandwidth {bandwidth / 1e9:8.2f} GB/s   efficiency "
                 + ", ".join(f"{b:.0e}:{e:.2f}" for b, e in memory_curve.points))

    if device.type == "cuda":
        num_bytes = 64 * 2**20
        seconds = _slowest_rank_s(measure_host_copy_s(num_bytes, device, settings), device)
        host_link = LinkSpec(_rounded(num_bytes / seconds), 0.0)
        progress.step("host -> device copy")
        memory_bytes = torch.cuda.get_device_properties(device).total_memory
    else:
        host_link = LinkSpec(bandwidth, base.host_link.latency_s if base.host_link else 0.0)
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // base.devices_per_node
    lines.append(f"host link {host_link.bandwidth_bytes_per_s / 1e9:8.2f} GB/s   device memory "
                 f"{memory_bytes / 2**30:.2f} GiB")
    lines.append(f"overhead  {overhead_s * 1e6:.1f} us per op of a training step ({dtensor_overhead_s * 1e6:.1f} us on "
                 f"DTensors), {optimizer_overhead_s * 1e6:.1f} us per parameter tensor of AdamW")

    links = {"intra_node": base.intra_node, "inter_node": base.inter_node}
    overrides: dict[str, dict[str, LinkSpec]] = {}
    for level in collective_levels:
        if level == "intra_node":
            group, _ = dist.new_subgroups(group_size=local_world) if num_nodes > 1 else (None, None)
            size = local_world
        else:
            by_local_rank = [[node * local_world + i for node in range(num_nodes)] for i in range(local_world)]
            group, _ = dist.new_subgroups_by_enumeration(by_local_rank)
            size = num_nodes
        fits = {}
        for collective in _COLLECTIVES:
            sizes, times = [], []
            for kib in settings["message_kib"]:
                num_bytes = kib * 1024
                seconds = measure_collective_s(collective, num_bytes, group, size, device, settings)
                sizes.append(float(num_bytes))
                times.append(_slowest_rank_s(seconds, device))
                progress.step(f"{level} {collective} {kib} KiB")
            fit = fit_alpha_beta(collective, size, sizes, times)
            if device.type == "cpu" and fit.link.bandwidth_bytes_per_s > bandwidth:
                # gloo between processes of one host copies through memory: a faster fit is noise on a flat line
                fit = dataclasses.replace(fit, link=LinkSpec(bandwidth, fit.link.latency_s))
            measured = ", ".join(f"{m / 1024:.0f} KiB {t * 1e6:.0f} us" for m, t in zip(sizes, times, strict=True))
            fits[collective] = LinkSpec(_rounded(fit.link.bandwidth_bytes_per_s), _rounded(fit.link.latency_s))
            lines.append(f"{level:<11}{collective:<15} n={size:<3} latency {fits[collective].latency_s * 1e6:9.1f} us"
                         f"   bus bandwidth {fits[collective].bandwidth_bytes_per_s / 1e9:8.3f} GB/s   ({measured})")
        links[level] = fits["all_reduce"]
        overrides[level] = {c: fits[c] for c in ("all_gather", "reduce_scatter")}

    devices_per_node = local_world if device.type == "cuda" else base.devices_per_node
    description = (f"calibrated by `meshplan calibrate` on {socket.gethostname()} ({num_nodes} node(s) x "
                   f"{local_world} rank(s), {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
                   f"torch {torch.__version__}{', quick' if quick else ''}) from base {base.name!r}; "
                   "usable_memory_fraction, overlap" + ("" if num_nodes > 1 else " and inter_node")
                   + " kept from the base")
    profile = dataclasses.replace(
        base, name=name, description=description, devices_per_node=devices_per_node, num_nodes=num_nodes,
        device_memory_bytes=int(memory_bytes), peak_flops_per_s=peaks, matmul_efficiency=curves,
        memory_bandwidth_bytes_per_s=bandwidth, memory_efficiency=memory_curve,
        kernel_overhead_s=_rounded(overhead_s), optimizer_tensor_overhead_s=_rounded(optimizer_overhead_s),
        dtensor_op_overhead_s=_rounded(dtensor_overhead_s),
        host_link=host_link,
        intra_node=links["intra_node"], inter_node=links["inter_node"],
        collective_links={**base.collective_links, **overrides})
    progress.finish(f"measured {progress.done} quantities")
    return profile, lines


def measure_in_run(base: Cluster, device: torch.device) -> tuple[Cluster, list[str]]:
    """This machine as a running job sees it: the calibration above with the `_IN_RUN` sizes, measured in the
    job's own ranks (process group initialised; every rank calls it and gets the same profile). `execute` calls
    it after the training steps of a CPU plan and re-costs the plan on the result, because on CPU processes
    the speed of a rank depends on how many processes share the cores at that moment (the ranks, and whatever
    else runs on the host), which no preset can know. Fields not measured are kept from `base`."""
    profile, lines = calibrate_rank(base, device, quick=True, name=f"{base.name}-measured", settings=_IN_RUN)
    world = dist.get_world_size() if dist.is_initialized() else 1
    scale, where = base.step_scale, f"base {base.name!r}"
    if scale.is_identity and device.type == "cpu":
        scale, where = in_run_step_scale(), f"costmodel/fitted/{_IN_RUN_SCALE_FILE}"
    description = (f"measured by `meshplan execute` inside a run of {world} rank(s) on {socket.gethostname()} "
                   f"(torch {torch.__version__}; median of {_IN_RUN['repeats']} repeats) from base {base.name!r}; "
                   f"step_scale from {where}")
    return dataclasses.replace(profile, description=description, step_scale=scale), lines


_IN_RUN_SCALE_FILE = "cpu_in_run.yaml"


def in_run_step_scale() -> StepScale:
    """The step scale fitted for CPU profiles measured inside runs (costmodel/fitted/cpu_in_run.yaml, written by
    `meshplan calibrate --from-runs` over the runs it names), used when the plan's profile has none of its own."""
    from importlib.resources import files

    import yaml

    from .cluster import _step_scale_from_dict

    data = yaml.safe_load((files("costmodel") / "fitted" / _IN_RUN_SCALE_FILE).read_text(encoding="utf-8"))
    return _step_scale_from_dict(_IN_RUN_SCALE_FILE, data["step_scale"])


def format_summary(profile: Cluster, lines: list[str], out: str) -> str:
    header = f"calibrated profile {profile.name!r}: {profile.num_nodes} node(s) x {profile.devices_per_node} devices"
    return "\n".join([header, *(f"  {line}" for line in lines), f"wrote {out}"])


def run_in_torchrun(out: str, base_name: str | None, quick: bool, name: str) -> Cluster:
    """This rank's part: init the process group (NCCL on GPUs, gloo on CPUs), measure, rank 0 writes `out`."""
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    base = load_cluster(base_name or default_base(device))
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        profile, lines = calibrate_rank(base, device, quick, name)
        dist.barrier()
    finally:
        if owns_group:
            dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        save_cluster(profile, out)
        print(format_summary(profile, lines, out), flush=True)
    return profile


def inside_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def launch(out: str, base_name: str | None, quick: bool, name: str, nproc_per_node: int | None) -> None:
    """Start `python -m torch.distributed.run --standalone --nproc-per-node=N -m costmodel.calibrate ...`."""
    if base_name is not None:
        load_cluster(base_name)  # fail fast, before starting processes, on a bad preset or path
    if nproc_per_node is None:
        nproc_per_node = torch.cuda.device_count() if torch.cuda.is_available() else 2
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}",
               "-m", "costmodel.calibrate", "--out", os.path.abspath(out), "--name", name]
    if base_name is not None:
        command += ["--base", base_name]
    if quick:
        command.append("--quick")
    completed = subprocess.run(command, env={**os.environ, **rank_import_environment()})
    if completed.returncode != 0:
        raise RuntimeError(f"calibration under torchrun exited with status {completed.returncode}; "
                           "see the rank output above")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="cluster.yaml", help="where to write the profile (default cluster.yaml)")
    parser.add_argument("--base", help="preset or YAML whose unmeasured fields are kept (default: cpu, or the "
                                       "GPU preset matching this device)")
    parser.add_argument("--name", default="calibrated", help="profile name written into the YAML")
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="ranks to start when not inside torchrun (default: GPUs, or 2 on CPU)")
    parser.add_argument("--quick", action="store_true", help="fewer and smaller sizes (seconds, for CI)")
    parser.add_argument("--progress", action="store_true", help="draw the progress bar on stderr even when it is "
                                                                f"not a terminal (same as {PROGRESS_ENV}=1)")


def calibrate(args: argparse.Namespace) -> None:
    """Entry point of `meshplan calibrate` and `python -m costmodel.calibrate`."""
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        raise ClusterError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
    if getattr(args, "progress", False):
        os.environ[PROGRESS_ENV] = "1"  # the torchrun ranks launched below inherit it
    if inside_torchrun():
        run_in_torchrun(args.out, args.base, args.quick, args.name)
    else:
        launch(args.out, args.base, args.quick, args.name, args.nproc_per_node)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m costmodel.calibrate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        calibrate(args)
    except ClusterError as err:
        print(f"calibrate: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
