"""Time of one operator, of recomputation, of the optimizer step and of host <-> device copies, on one device.

Roofline with measured efficiency curves:
    time_s = max(flops / (peak_flops_per_s[dtype] * e_mm(flops)),
                 bytes_accessed / (memory_bandwidth_bytes_per_s * e_mem(bytes_accessed)))
             [+ kernel_overhead_s when the caller counts the launch]
where e_mm is the profile's matmul efficiency curve for dtype (log-linear in FLOPs; 1 for non-matmul
FLOPs) and e_mem its memory-bound curve (log-linear in bytes moved).

Blind spots: compute and memory traffic overlap perfectly (the max, not the sum); efficiency depends on the
op's total FLOPs or bytes only, not on its shape (a skinny matmul is priced like a square one of equal
FLOPs); cache reuse between ops is ignored; the launch overhead is one fixed number per op (no CUDA graphs,
no fusion); non-matmul FLOPs run at full peak (they are almost always memory-bound anyway).
"""

import math

from .cluster import Cluster, ClusterError
from .dtypes import dtype_bytes, normalize_dtype_name

__all__ = [
    "dtype_bytes",
    "host_transfer_time_s",
    "issued_time_s",
    "kernel_overhead_time_s",
    "op_time_s",
    "optimizer_bytes_per_param",
    "optimizer_step_time_s",
    "recompute_time_s",
]

_FP32_BYTES = 4  # master weights and optimizer moments are float32 in every optimizer priced here


def _check_amount(field: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{field} must be a finite number >= 0, got {value!r}")
    return float(value)


def op_time_s(flops: float, bytes_accessed: float, cluster: Cluster, dtype: str = "float32",
              is_matmul: bool = True, include_overhead: bool = False) -> float:
    """Seconds for one op doing `flops` FLOPs and moving `bytes_accessed` bytes of device memory.

    max(flops / (peak * e_mm(flops) if is_matmul else peak), bytes / (bandwidth * e_mem(bytes))), plus
    cluster.kernel_overhead_s when include_overhead, each times the profile's step_scale (compute,
    host_overhead; 1 unless fitted from runs). `peak` is cluster.peak_flops_per_s[dtype], falling back
    to the float32 peak (and curve) when the profile does not list `dtype`. Units: FLOPs, bytes -> seconds.
    Blind spot: the curves are indexed by the size of this call, so pass one op at a time; summing many ops
    into one call prices them as one big op (too efficient).
    """
    flops = _check_amount("flops", flops)
    bytes_accessed = _check_amount("bytes_accessed", bytes_accessed)
    peaks = cluster.peak_flops_per_s
    peak = peaks.get(normalize_dtype_name(dtype), peaks["float32"])
    compute_s = 0.0
    if flops:
        efficiency = cluster.matmul_efficiency_at(flops, dtype) if is_matmul else 1.0
        compute_s = flops / (peak * efficiency)
    memory_s = 0.0
    if bytes_accessed:
        memory_s = bytes_accessed / (cluster.memory_bandwidth_bytes_per_s * cluster.memory_efficiency.at(
            bytes_accessed))
    overhead_s = cluster.kernel_overhead_s * cluster.step_scale.host_overhead if include_overhead else 0.0
    return max(compute_s, memory_s) * cluster.step_scale.compute + overhead_s


def issued_time_s(device_s: float, host_s: float, cluster: Cluster) -> float:
    """Wall seconds of a run of ops whose kernels take `device_s` on the device and `host_s` to issue on the host.

    CUDA (device_type "cuda"): the host enqueues kernels on a stream and runs ahead of the device, so the two
    overlap and the slower one bounds the run: max(device_s, host_s). CPU processes run the kernels on the
    same core that dispatches them: device_s + host_s. Apply it per stretch of ops that the host issues without
    waiting for the device (one phase of one layer); a synchronising op (`.item()`, a blocking collective)
    ends a stretch. Blind spot: the first kernel of a stretch still waits for its own launch (one
    kernel_overhead_s per stretch is not charged).
    """
    device_s = _check_amount("device_s", device_s)
    host_s = _check_amount("host_s", host_s)
    return max(device_s, host_s) if cluster.device_type == "cuda" else device_s + host_s


def kernel_overhead_time_s(num_ops: float, cluster: Cluster) -> float:
    """num_ops * cluster.kernel_overhead_s: fixed launch/dispatch cost of `num_ops` ops (seconds).

    Blind spot: on CPU eager mode the overhead of DTensor/FSDP hooks per op is larger than a plain op's; the
    calibrated number is a plain tiny op.
    """
    return _check_amount("num_ops", num_ops) * cluster.kernel_overhead_s * cluster.step_scale.host_overhead


def recompute_time_s(forward_time_s: float) -> float:
    """Extra time of activation recomputation: the checkpointed forward runs again in backward, so this is
    its forward time once more (seconds). Blind spots: selective recomputation of only the cheap ops is
    priced by passing just those ops' forward time; RNG-state saving and the recompute's extra launches are
    ignored."""
    return _check_amount("forward_time_s", forward_time_s)


def optimizer_bytes_per_param(optimizer: str, param_dtype: str = "float32", master_weights: bool = False) -> float:
    """Bytes of device memory one parameter's update reads and writes (p = dtype_bytes(param_dtype)).

    Without master weights: read gradient (p), read + write the parameter (2p), read + write each float32
    state (8 B each): sgd 3p, sgd_momentum 3p + 8, adam/adamw 3p + 16 (fp32: 12, 20, 28 B).
    With float32 master weights (mixed precision): read gradient (p), read + write master (8), read + write
    each state (8 each), write the low-precision copy (p): sgd 2p + 8, sgd_momentum 2p + 16,
    adam/adamw 2p + 24 (bf16: 28 B). Blind spot: fused/foreach kernels that keep temporaries in cache.
    """
    states = {"sgd": 0, "sgd_momentum": 1, "adam": 2, "adamw": 2}
    if optimizer not in states:
        raise ValueError(f"unknown optimizer {optimizer!r}; supported optimizers: {', '.join(states)}")
    p = dtype_bytes(param_dtype)
    state_bytes = states[optimizer] * 2 * _FP32_BYTES
    if master_weights:
        return p + 2 * _FP32_BYTES + state_bytes + p
    return p + 2 * p + state_bytes


def optimizer_step_time_s(num_params: int, cluster: Cluster, bytes_per_param_touched: float = 16 * 2, *,
                          optimizer: str | None = None, param_dtype: str = "float32", master_weights: bool = False,
                          num_tensors: int = 0) -> float:
    """Seconds for a memory-bound optimizer update of `num_params` parameters on one device.

    num_params * bytes_per_param / (memory_bandwidth * e_mem(total bytes))
        + num_tensors * optimizer_tensor_overhead_s, times step_scale.optimizer.
    bytes_per_param is `optimizer_bytes_per_param(optimizer, param_dtype, master_weights)` when `optimizer`
    is given, else `bytes_per_param_touched` (default 32 B/param: the skeleton's AdamW figure, kept for old
    callers). Pass num_params per shard under ZeRO and num_tensors = number of parameter tensors; the
    profile's per-tensor overhead is measured with torch's default AdamW implementation for the device.
    Blind spots: the update's FLOPs (a few per parameter) are ignored: it is memory-bound on every device
    priced here.
    """
    if isinstance(num_params, bool) or not isinstance(num_params, int) or num_params < 0:
        raise ValueError(f"num_params must be an integer >= 0, got {num_params!r}")
    if optimizer is not None:
        touched = optimizer_bytes_per_param(optimizer, param_dtype, master_weights)
    else:
        touched = _check_amount("bytes_per_param_touched", bytes_per_param_touched)
    total = num_params * touched
    memory_s = 0.0
    if total:
        memory_s = total / (cluster.memory_bandwidth_bytes_per_s * cluster.memory_efficiency.at(total))
    if isinstance(num_tensors, bool) or not isinstance(num_tensors, int) or num_tensors < 0:
        raise ValueError(f"num_tensors must be an integer >= 0, got {num_tensors!r}")
    return (memory_s + num_tensors * cluster.optimizer_tensor_overhead_s) * cluster.step_scale.optimizer


def host_transfer_time_s(num_bytes: float, cluster: Cluster) -> float:
    """Seconds to copy `num_bytes` between device and host memory one way (offloaded activations,
    parameters or optimizer states): host_link.latency_s + num_bytes / host_link.bandwidth_bytes_per_s.

    Blind spots: assumes pinned host memory and one copy at a time per device (no PCIe-switch sharing
    between GPUs); overlap with compute is the caller's to apply (`exposed_time_s`).
    """
    num_bytes = _check_amount("num_bytes", num_bytes)
    link = cluster.host_link
    if link is None:
        raise ClusterError(
            f"cluster {cluster.name!r}: no host_link in the profile, so offload cannot be priced; add "
            "`host_link: {bandwidth_gb_per_s: ..., latency_us: ...}` (see costmodel/presets/a100-80g.yaml) or "
            "run `meshplan calibrate`"
        )
    if not num_bytes:
        return 0.0
    return link.latency_s + num_bytes / link.bandwidth_bytes_per_s
