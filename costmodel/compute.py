"""Time of one operator and of the optimizer step on one device, by the roofline model.

Formula:
    time_s = max(flops / (peak_flops_per_s[dtype] * efficiency),
                 bytes_accessed / memory_bandwidth_bytes_per_s)
with efficiency = cluster.matmul_efficiency for matmul-class ops and 1 otherwise.

Blind spots: compute and memory traffic are assumed to overlap perfectly (the max, not the sum); kernel
launch overhead, cache reuse and small-shape inefficiency are ignored, so tiny ops are predicted too fast;
non-matmul ops are priced at full peak, which matters little because they are almost always memory-bound.
"""

import math

from .cluster import Cluster
from .dtypes import dtype_bytes, normalize_dtype_name

__all__ = ["dtype_bytes", "op_time_s", "optimizer_step_time_s"]


def _check_amount(field: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{field} must be a finite number >= 0, got {value!r}")
    return float(value)


def op_time_s(flops: float, bytes_accessed: float, cluster: Cluster, dtype: str = "float32",
              is_matmul: bool = True) -> float:
    """Seconds for one op doing `flops` FLOPs and moving `bytes_accessed` bytes of device memory.

    max(flops / (peak * (matmul_efficiency if is_matmul else 1)), bytes_accessed / memory_bandwidth).
    `peak` is cluster.peak_flops_per_s[dtype], falling back to the float32 peak when the profile does not list
    `dtype` (so int8 or float64 ops are priced at float32 speed unless the profile says otherwise).
    """
    flops = _check_amount("flops", flops)
    bytes_accessed = _check_amount("bytes_accessed", bytes_accessed)
    peaks = cluster.peak_flops_per_s
    peak = peaks.get(normalize_dtype_name(dtype), peaks["float32"])
    efficiency = cluster.matmul_efficiency if is_matmul else 1.0
    compute_s = flops / (peak * efficiency)
    memory_s = bytes_accessed / cluster.memory_bandwidth_bytes_per_s
    return max(compute_s, memory_s)


def optimizer_step_time_s(num_params: int, cluster: Cluster,
                          bytes_per_param_touched: float = 16 * 2) -> float:
    """Seconds for a memory-bound optimizer update of `num_params` parameters on one device.

    num_params * bytes_per_param_touched / memory_bandwidth_bytes_per_s. The default, 32 B/param, is AdamW in
    float32 reading and writing parameter, gradient and both moments (4 tensors x 4 B x read + write). Pass a
    larger figure for mixed precision with a master copy, and num_params per shard under ZeRO.
    Blind spot: the update's FLOPs and per-tensor launch overhead (unfused, non-foreach optimizers) are
    ignored.
    """
    if isinstance(num_params, bool) or not isinstance(num_params, int) or num_params < 0:
        raise ValueError(f"num_params must be an integer >= 0, got {num_params!r}")
    touched = _check_amount("bytes_per_param_touched", bytes_per_param_touched)
    return num_params * touched / cluster.memory_bandwidth_bytes_per_s
