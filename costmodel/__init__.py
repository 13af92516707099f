"""meshplan cost model: cluster profiles and the time and memory formulas the planner prices plans with.

    cluster.py        Cluster / LinkSpec / EfficiencyCurve / OverlapSpec profiles, YAML load and save, presets
    PROFILE.md        the profile YAML, field by field, with units
    presets/*.yaml    shipped cluster profiles (a100-40g, a100-80g, h100, h200, l40s, cpu), sources inside
    dtypes.py         bytes per element by torch dtype name
    compute.py        roofline op time on efficiency curves, launch overhead, recompute, optimizer, offload copies
    communication.py  alpha-beta collectives (a ring on the slowest level a group spans), exposed time
    overlap.py        data-parallel gathers and reductions hidden behind a layer's compute
    memory.py         model states with ZeRO, transformer activations, pipeline in-flight and bubble, buffers
    calibrate.py      `meshplan calibrate`: measure this machine and write a profile
"""

from .cluster import (
    Cluster,
    ClusterError,
    EfficiencyCurve,
    LinkSpec,
    OverlapSpec,
    StepScale,
    list_presets,
    load_cluster,
    save_cluster,
)
from .communication import (
    all_gather_time_s,
    all_reduce_time_s,
    all_to_all_time_s,
    exposed_time_s,
    point_to_point_time_s,
    reduce_scatter_time_s,
)
from .compute import (
    dtype_bytes,
    host_transfer_time_s,
    issued_time_s,
    kernel_overhead_time_s,
    op_time_s,
    optimizer_bytes_per_param,
    optimizer_step_time_s,
    recompute_time_s,
)
from .memory import (
    ModelStateBytes,
    collective_buffer_bytes,
    in_flight_microbatches,
    model_state_bytes,
    pipeline_bubble_fraction,
    sharded_model_state_bytes,
    transformer_layer_activation_bytes,
)
from .overlap import data_parallel_exposed_s

__all__ = [
    "Cluster",
    "ClusterError",
    "EfficiencyCurve",
    "LinkSpec",
    "ModelStateBytes",
    "OverlapSpec",
    "StepScale",
    "all_gather_time_s",
    "all_reduce_time_s",
    "all_to_all_time_s",
    "collective_buffer_bytes",
    "data_parallel_exposed_s",
    "dtype_bytes",
    "exposed_time_s",
    "host_transfer_time_s",
    "in_flight_microbatches",
    "issued_time_s",
    "kernel_overhead_time_s",
    "list_presets",
    "load_cluster",
    "model_state_bytes",
    "op_time_s",
    "optimizer_bytes_per_param",
    "optimizer_step_time_s",
    "pipeline_bubble_fraction",
    "point_to_point_time_s",
    "recompute_time_s",
    "reduce_scatter_time_s",
    "save_cluster",
    "sharded_model_state_bytes",
    "transformer_layer_activation_bytes",
]
