"""The Plan: the only contract between planner and runtime, stored as human-editable, versioned YAML.

Times are in milliseconds and memory in MiB (2**20 bytes) so a person can read them; the names say so.
`Plan.load` uses `yaml.safe_load` only, rejects unknown keys and wrong types with the field's name, and
checks that the pieces agree (mesh size = world size, tensor-parallel layers name their linears).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from planner.plan_schema import PlanError, from_plain, to_plain

SCHEMA_VERSION = 1
STRATEGIES = ("replicate", "tensor")
DATA_PARALLEL_KINDS = ("fsdp",)


@dataclass
class ModelRef:
    """Which model the plan was made for."""

    source: str
    """`path/to/file.py:function` returning a ModelSpec; relative paths resolve from the cwd or the plan's folder."""
    fingerprint: str
    """Hash of the traced forward graph; `execute` refuses a model whose graph differs."""
    num_parameters: int
    global_batch_size: int


@dataclass
class MeshShape:
    """Sizes of the device mesh axes; ranks are laid out row-major over (dp, tp), tp fastest (inside a node)."""

    dp: int
    tp: int


@dataclass
class TensorParallelUnitPlan:
    """Linears split by output features (`colwise`) feeding one split by input features (`rowwise`)."""

    colwise: list[str]
    rowwise: str


@dataclass
class LayerPlan:
    """What one layer of the chain does."""

    path: str
    """Module path, e.g. `blocks.3`."""
    kind: str
    """Layers with the same kind are structurally identical and were costed once."""
    strategy: str
    """`replicate` (every tp rank runs the whole layer) or `tensor` (its units are sharded over tp)."""
    tensor_parallel: list[TensorParallelUnitPlan] = field(default_factory=list)
    """Units applied when strategy is `tensor`; paths relative to the layer."""
    predicted_time_ms: float = 0.0
    predicted_memory_mib: float = 0.0


@dataclass
class Prediction:
    """Predicted per-step time and per-device memory of the whole plan."""

    step_time_ms: float
    compute_ms: float
    communication_ms: float
    optimizer_ms: float
    peak_memory_mib: float
    parameters_mib: float
    gradients_mib: float
    optimizer_states_mib: float
    activations_mib: float
    memory_limit_mib: float


@dataclass
class Plan:
    """A complete, runnable parallelization decision."""

    schema_version: int
    model: ModelRef
    cluster: dict[str, Any]
    """The cluster profile the plan was costed on (same form as a cluster YAML)."""
    world_size: int
    mesh: MeshShape
    data_parallel: str
    """`fsdp`: parameters, gradients and optimizer states sharded over dp (ZeRO-3, FSDP2 fully_shard)."""
    layers: list[LayerPlan]
    predicted: Prediction
    seed: int = 0
    """Random seed every rank uses to build the initial weights."""

    def validate(self, source: str = "plan") -> None:
        """Raise PlanError if the parts of the plan contradict each other."""
        if self.schema_version != SCHEMA_VERSION:
            raise PlanError(f"{source}: schema_version {self.schema_version} is not supported; this meshplan "
                            f"reads version {SCHEMA_VERSION}. Re-run `meshplan plan` to regenerate it.")
        for name in ("dp", "tp"):
            if getattr(self.mesh, name) < 1:
                raise PlanError(f"{source}: field 'mesh.{name}' must be >= 1, got {getattr(self.mesh, name)}")
        if self.world_size < 1:
            raise PlanError(f"{source}: field 'world_size' must be >= 1, got {self.world_size}")
        if self.mesh.dp * self.mesh.tp != self.world_size:
            raise PlanError(f"{source}: mesh dp={self.mesh.dp} x tp={self.mesh.tp} = "
                            f"{self.mesh.dp * self.mesh.tp} ranks, but world_size is {self.world_size}. "
                            "Make the product of the mesh axes equal world_size.")
        if self.data_parallel not in DATA_PARALLEL_KINDS:
            raise PlanError(f"{source}: field 'data_parallel' must be one of {list(DATA_PARALLEL_KINDS)}, "
                            f"got {self.data_parallel!r}")
        if self.model.global_batch_size % self.mesh.dp:
            raise PlanError(f"{source}: global_batch_size {self.model.global_batch_size} is not divisible by "
                            f"dp={self.mesh.dp}; choose a dp that divides it.")
        if not self.layers:
            raise PlanError(f"{source}: field 'layers' is empty; a plan needs at least one layer")
        seen = set()
        for i, layer in enumerate(self.layers):
            where = f"layers[{i}] ({layer.path or '<root>'})"
            if layer.path in seen:
                raise PlanError(f"{source}: {where} appears twice")
            seen.add(layer.path)
            if layer.strategy not in STRATEGIES:
                raise PlanError(f"{source}: field '{where}.strategy' must be one of {list(STRATEGIES)}, "
                                f"got {layer.strategy!r}")
            if layer.strategy == "tensor" and not layer.tensor_parallel:
                raise PlanError(f"{source}: {where} has strategy 'tensor' but no tensor_parallel units; "
                                "this layer has no column/row linear pairs, use strategy 'replicate'")

    def to_yaml(self) -> str:
        return yaml.safe_dump(to_plain(self), sort_keys=False, default_flow_style=None, width=100)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan atomically (temp file + rename), so a crash never leaves half a plan."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_yaml())
        os.replace(tmp, path)

    @classmethod
    def from_yaml(cls, text: str, source: str = "plan") -> Plan:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise PlanError(f"{source}: not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise PlanError(f"{source}: a plan must be a YAML mapping at the top level, got {type(data).__name__}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise PlanError(f"{source}: field 'schema_version' must be {SCHEMA_VERSION}, got {version!r}")
        plan = from_plain(cls, data, "", source)
        plan.validate(source)
        return plan

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise PlanError(f"{path}: cannot read plan file: {err.strerror}") from err
        return cls.from_yaml(text, str(path))
