"""meshplan cost model: cluster profiles and the time and memory formulas the planner prices plans with.

    cluster.py        Cluster / LinkSpec profiles, YAML load and save, presets
    presets/*.yaml    shipped cluster profiles (a100-80g, cpu)
    dtypes.py         bytes per element by torch dtype name
    compute.py        roofline op time, optimizer step time
    communication.py  alpha-beta ring collectives and point-to-point
    memory.py         parameters, gradients, optimizer states; ZeRO sharding
"""

from .cluster import Cluster, ClusterError, LinkSpec, list_presets, load_cluster, save_cluster
from .communication import all_gather_time_s, all_reduce_time_s, point_to_point_time_s, reduce_scatter_time_s
from .compute import dtype_bytes, op_time_s, optimizer_step_time_s
from .memory import ModelStateBytes, model_state_bytes, sharded_model_state_bytes

__all__ = [
    "Cluster",
    "ClusterError",
    "LinkSpec",
    "ModelStateBytes",
    "all_gather_time_s",
    "all_reduce_time_s",
    "dtype_bytes",
    "list_presets",
    "load_cluster",
    "model_state_bytes",
    "op_time_s",
    "optimizer_step_time_s",
    "point_to_point_time_s",
    "reduce_scatter_time_s",
    "save_cluster",
    "sharded_model_state_bytes",
]
