"""The Plan: the only contract between planner and runtime, stored as human-editable, versioned YAML.

Times are in milliseconds and memory in MiB (2**20 bytes) so a person can read them; the names say so.
`Plan.load` uses `yaml.safe_load` only, rejects unknown keys and wrong types with the field's name, and
checks that the pieces agree (mesh size = world size, tensor-parallel layers name their linears).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from costmodel import Cluster, ClusterError
from costmodel.bounded_yaml import brief, load_bounded, read_bounded_text
from planner.plan_schema import OMIT_IF_DEFAULT, PlanError, from_plain, to_plain

SCHEMA_VERSION = 2
STRATEGIES = ("replicate", "tensor", "tensor2d", "vocab")
DATA_PARALLEL_KINDS = ("ddp", "zero1", "zero2", "zero3")
CHECKPOINT_KINDS = ("none", "selective", "full")
SCHEDULES = ("none", "gpipe", "1f1b", "interleaved_1f1b")
PARAM_DTYPES = ("float32", "bfloat16", "float16")


def grid_rows_options(tp: int) -> list[int]:
    """Every `tp_rows` that lays tp out as a grid of at least 2 x 2 (strategy `tensor2d`)."""
    return [rows for rows in range(2, tp // 2 + 1) if tp % rows == 0 and tp // rows >= 2]


@dataclass
class ModelRef:
    """Which model the plan was made for."""

    source: str
    """`path/to/file.py:function` returning a ModelSpec, or `hf:PATH?task=..&seq-len=..&global-batch=..` (a Hugging
    Face config, planner/hf_source.py); relative paths resolve from the cwd or the plan's folder."""
    fingerprint: str
    """Hash of the traced forward graph; `execute` refuses a model whose graph differs."""
    num_parameters: int
    global_batch_size: int
    source_sha256: str = ""
    """sha256 (hex) of the MODEL file when the plan was made; `execute` refuses a file that no longer matches
    before importing it (`--accept-model-change` runs it anyway). Empty in plans written before it existed."""


@dataclass
class MeshShape:
    """Sizes of the device mesh axes; ranks are laid out row-major over (pp, dp, tp), tp fastest.

    So a tensor-parallel group is contiguous (inside a node), data-parallel peers are strided by tp, and
    pipeline stages are the slowest axis (across nodes first).
    """

    pp: int
    dp: int
    tp: int


@dataclass
class DataParallelPlan:
    """How model states are replicated or sharded over the dp axis."""

    kind: str
    """`ddp` (everything replicated, gradients all-reduced), `zero1` (optimizer states sharded), `zero2`
    (gradients too), `zero3` (parameters too: FSDP2 `fully_shard`)."""
    replicate: int = 1
    """HSDP: dp = replicate x shard; states are sharded inside groups of dp / replicate ranks and replicated
    across the `replicate` groups. 1 = shard over all of dp."""
    reshard_after_forward: bool = True
    """zero3 only: free gathered parameters after forward and gather again for backward (False keeps them)."""
    offload: bool = False
    """zero3 only: parameters, gradients and optimizer states live on the host (`CPUOffloadPolicy`)."""


@dataclass
class PrecisionPlan:
    """Mixed precision: compute in `param_dtype`, keep fp32 master weights and optimizer states."""

    param_dtype: str = "float32"
    reduce_dtype: str = "float32"
    """Dtype of gradient reduction across dp ranks."""


@dataclass
class PipelinePlan:
    """Micro-batching and the pipeline schedule.

    micro-batch size = global batch / (dp x num_microbatches). With pp = 1, num_microbatches > 1 means
    gradient accumulation and schedule is `none`.
    """

    schedule: str = "none"
    """`none` (pp = 1), `gpipe`, `1f1b` or `interleaved_1f1b` (torch.distributed.pipelining schedules)."""
    num_microbatches: int = 1
    """Micro-batches per optimizer step on each dp rank."""
    virtual_stages: int = 1
    """Stages per pipeline rank; > 1 only for `interleaved_1f1b` (stage s runs on pp rank s % pp)."""


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
    """`replicate` (every tp rank runs the whole layer), `tensor` (its units are sharded over tp, Megatron
    style), `tensor2d` (its units are sharded over tp laid out as a `tp_rows` x tp / tp_rows grid, see
    `tp_rows`) or `vocab` (the layer is an nn.Embedding sharded on its rows, or an output-head nn.Linear
    sharded on its output features whose logits stay sharded into a cross-entropy loss computed with
    `loss_parallel`; pp = 1)."""
    tensor_parallel: list[TensorParallelUnitPlan] = field(default_factory=list)
    """Units applied when strategy is `tensor` or `tensor2d`; paths relative to the layer."""
    tp_rows: int = field(default=0, metadata=OMIT_IF_DEFAULT)
    """`tensor2d` layers only (0 otherwise, and then not written): the tp group as a grid of tp_rows x
    (tp / tp_rows) ranks, both >= 2. Inside each unit, activations split their batch over the rows and their
    features over the columns; every linear's weight splits its input features over the rows and its output
    features over the columns. Each linear all-gathers its input over the columns and its weight over the
    rows (SUMMA as all-gathers); the unit's output is gathered back to every rank."""
    sequence_parallel: bool = False
    """`tensor` layers only: norms and dropout outside the units run sharded on the sequence dimension."""
    stage: int = 0
    """Pipeline stage (0 .. pp x virtual_stages - 1); stages are contiguous runs of the chain, in order."""
    checkpoint: str = "none"
    """Activation checkpointing: `none`, `selective` (save matmul outputs, recompute the rest) or `full`
    (keep only the layer input, recompute the layer in backward)."""
    offload_activations: bool = False
    """Saved activations wait on the host between forward and backward (`save_on_cpu`)."""
    predicted_time_ms: float = 0.0
    predicted_memory_mib: float = 0.0


@dataclass
class StagePrediction:
    """Predicted time of one pipeline stage for one micro-batch (what `meshplan show --timeline` draws)."""

    forward_ms: float
    """Forward of the stage's layers, its tensor-parallel all-reduces, offload of saved activations and the
    send of its input's share of pipeline traffic (half of the stage's p2p time)."""
    backward_ms: float
    """Backward, recomputation of checkpointed layers, the rest of the all-reduces, offload and p2p."""


@dataclass
class Prediction:
    """Predicted per-step time and per-device memory of the whole plan.

    Time is the slowest pipeline rank's step: step_time_ms = compute_ms + communication_ms + offload_ms +
    optimizer_ms + bubble_ms. Memory is the fullest rank's peak: peak_memory_mib = parameters_mib +
    gradients_mib + optimizer_states_mib + activations_mib + buffers_mib.

    Fields added within schema version 2 (`buffers_mib`, `offload_ms`, `stages`) are optional: a plan written
    before them loads with None / [] and then `activations_mib` includes the buffers and `communication_ms`
    the offload time, as those plans counted them.
    """

    step_time_ms: float
    compute_ms: float
    """Forward and backward of the layers, including recompute_ms."""
    communication_ms: float
    """Exposed tensor-parallel, data-parallel and pipeline communication (and offload when offload_ms is None)."""
    optimizer_ms: float
    peak_memory_mib: float
    parameters_mib: float
    """On the device, at the peak. 0 with data_parallel.offload: sharded parameters, gradients and optimizer
    states then live on the host (the layer being gathered counts under activations_mib, as a buffer)."""
    gradients_mib: float
    optimizer_states_mib: float
    activations_mib: float
    """Saved activations of the micro-batches in flight (and the buffers when buffers_mib is None)."""
    memory_limit_mib: float
    bubble_ms: float = 0.0
    """Pipeline idle time per step (included in step_time_ms)."""
    recompute_ms: float = 0.0
    """Forward recomputation of checkpointed layers (included in compute_ms)."""
    buffers_mib: float | None = None
    """Working buffers at the peak: the largest gathered ZeRO-3 layer and what a checkpointed layer
    rematerialises for its backward."""
    offload_ms: float | None = None
    """Host<->device traffic of offloaded activations and model states, not hidden behind compute."""
    stages: list[StagePrediction] = field(default_factory=list)
    """Per pipeline stage (index = stage), time per micro-batch; one entry when pp = 1."""


@dataclass
class Alternative:
    """A configuration the search priced and did not choose, for `meshplan show --why`."""

    summary: str
    """Short form, e.g. `pp1 dp4 tp1 zero3 mb1 x8, ckpt none`."""
    step_time_ms: float
    peak_memory_mib: float
    why_not: str
    """Why it lost: slower by how much and where the time goes, or how far over the memory limit."""


@dataclass
class Plan:
    """A complete, runnable parallelization decision."""

    schema_version: int
    model: ModelRef
    cluster: dict[str, Any]
    """The cluster profile the plan was costed on (same form as a cluster YAML)."""
    world_size: int
    mesh: MeshShape
    data_parallel: DataParallelPlan
    precision: PrecisionPlan
    pipeline: PipelinePlan
    layers: list[LayerPlan]
    predicted: Prediction
    alternatives: list[Alternative] = field(default_factory=list)
    seed: int = 0
    """Random seed every rank uses to build the initial weights."""

    @property
    def num_stages(self) -> int:
        return self.mesh.pp * self.pipeline.virtual_stages

    @property
    def uses_tensor_parallel(self) -> bool:
        """Some layer is sharded over tp > 1 (`tensor`, `tensor2d` or `vocab`): its parameters are DTensors."""
        return self.mesh.tp > 1 and any(layer.strategy in ("tensor", "tensor2d", "vocab") for layer in self.layers)

    @property
    def micro_batch_size(self) -> int:
        return self.model.global_batch_size // (self.mesh.dp * self.pipeline.num_microbatches)

    def validate(self, source: str = "plan") -> None:
        """Raise PlanError if the parts of the plan contradict each other."""
        if self.schema_version != SCHEMA_VERSION:
            raise PlanError(f"{source}: schema_version {self.schema_version} is not supported; this meshplan "
                            f"reads version {SCHEMA_VERSION}. Re-run `meshplan plan` to regenerate it.")
        mesh, dpp, pipe = self.mesh, self.data_parallel, self.pipeline
        for name in ("pp", "dp", "tp"):
            if getattr(mesh, name) < 1:
                raise PlanError(f"{source}: field 'mesh.{name}' must be >= 1, got {getattr(mesh, name)}")
        if self.world_size < 1:
            raise PlanError(f"{source}: field 'world_size' must be >= 1, got {self.world_size}")
        self._validate_sizes(source)
        if mesh.pp * mesh.dp * mesh.tp != self.world_size:
            raise PlanError(f"{source}: mesh pp={mesh.pp} x dp={mesh.dp} x tp={mesh.tp} = "
                            f"{mesh.pp * mesh.dp * mesh.tp} ranks, but world_size is {self.world_size}. "
                            "Make the product of the mesh axes equal world_size.")
        _check_choice(source, "data_parallel.kind", dpp.kind, DATA_PARALLEL_KINDS)
        if dpp.replicate < 1 or mesh.dp % dpp.replicate:
            raise PlanError(f"{source}: field 'data_parallel.replicate' must be a divisor of dp={mesh.dp}, "
                            f"got {dpp.replicate}")
        if dpp.replicate > 1 and dpp.kind == "ddp":
            raise PlanError(f"{source}: data_parallel.replicate > 1 (HSDP) needs a sharded kind "
                            "(zero1/zero2/zero3), not ddp")
        if dpp.offload and dpp.kind != "zero3":
            raise PlanError(f"{source}: data_parallel.offload needs kind 'zero3' (FSDP2 CPUOffloadPolicy), "
                            f"got {dpp.kind!r}")
        _check_choice(source, "precision.param_dtype", self.precision.param_dtype, PARAM_DTYPES)
        _check_choice(source, "precision.reduce_dtype", self.precision.reduce_dtype, PARAM_DTYPES)
        self._validate_pipeline(source)
        if not self.layers:
            raise PlanError(f"{source}: field 'layers' is empty; a plan needs at least one layer")
        seen = set()
        previous_stage = 0
        for i, layer in enumerate(self.layers):
            where = f"layers[{i}] ({layer.path or '<root>'})"
            if layer.path in seen:
                raise PlanError(f"{source}: {where} appears twice")
            seen.add(layer.path)
            _check_choice(source, f"{where}.strategy", layer.strategy, STRATEGIES)
            _check_choice(source, f"{where}.checkpoint", layer.checkpoint, CHECKPOINT_KINDS)
            if layer.strategy == "tensor" and not layer.tensor_parallel:
                raise PlanError(f"{source}: {where} has strategy 'tensor' but no tensor_parallel units; "
                                "this layer has no column/row linear pairs, use strategy 'replicate'")
            if layer.strategy == "vocab" and (layer.tensor_parallel or layer.checkpoint != "none"
                                              or layer.offload_activations):
                raise PlanError(f"{source}: {where} has strategy 'vocab', which shards the whole layer on the "
                                "vocabulary and takes no tensor_parallel units, checkpoint or "
                                "offload_activations; remove them or use strategy 'replicate'")
            self._validate_tensor_2d(source, where, layer)
            if layer.sequence_parallel and (layer.strategy != "tensor" or mesh.tp == 1):
                raise PlanError(f"{source}: {where} has sequence_parallel but is not tensor-parallel on tp > 1")
            if not previous_stage <= layer.stage <= previous_stage + 1:
                raise PlanError(f"{source}: {where} is on stage {layer.stage} after a layer on stage "
                                f"{previous_stage}; stages must be contiguous runs of the chain numbered "
                                "0, 1, 2, ... in order")
            previous_stage = layer.stage
        if previous_stage != self.num_stages - 1:
            raise PlanError(f"{source}: the layers use stages 0..{previous_stage}, but pp={mesh.pp} x "
                            f"virtual_stages={pipe.virtual_stages} needs stages 0..{self.num_stages - 1}; "
                            "give every stage at least one layer")

    def _validate_tensor_2d(self, source: str, where: str, layer: LayerPlan) -> None:
        """A `tensor2d` layer names units and a grid of at least 2 x 2 that tiles tp; no other layer has tp_rows."""
        tp = self.mesh.tp
        if layer.strategy != "tensor2d":
            if layer.tp_rows:
                raise PlanError(f"{source}: {where} has tp_rows {layer.tp_rows} but strategy {layer.strategy!r}; "
                                "tp_rows belongs to strategy 'tensor2d' only, remove it")
            return
        if not layer.tensor_parallel:
            raise PlanError(f"{source}: {where} has strategy 'tensor2d' but no tensor_parallel units; "
                            "this layer has no column/row linear pairs, use strategy 'replicate'")
        if layer.tp_rows < 2 or tp % layer.tp_rows or tp // layer.tp_rows < 2:
            grids = [str(rows) for rows in grid_rows_options(tp)]
            fix = f"use one of {', '.join(grids)}" if grids else "tp must be at least 4 and not prime; use 'tensor'"
            raise PlanError(f"{source}: {where} has strategy 'tensor2d' with tp_rows {layer.tp_rows}, which does "
                            f"not lay tp={tp} out as a grid of at least 2 x 2 ranks; {fix}")

    def _validate_sizes(self, source: str) -> None:
        """Sizes that no plan can have (a person's typo or a fuzzed file): empty batches, negative counts,
        NaN or negative predictions, a cluster profile that does not load or holds fewer devices than the plan."""
        if self.model.global_batch_size < 1:
            raise PlanError(f"{source}: field 'model.global_batch_size' must be >= 1, got "
                            f"{self.model.global_batch_size}")
        sha = self.model.source_sha256
        if sha and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
            raise PlanError(f"{source}: field 'model.source_sha256' must be 64 hexadecimal digits (sha256sum of the "
                            f"MODEL file) or empty, got {brief(sha)}; re-run `meshplan plan`")
        if not 0 <= self.seed < 2**63:
            raise PlanError(f"{source}: field 'seed' must be an integer in 0 .. 2**63 - 1 (torch's generators take "
                            f"64-bit seeds), got {brief(self.seed)}; use a smaller seed such as 0")
        if self.model.num_parameters < 0:
            raise PlanError(f"{source}: field 'model.num_parameters' must be >= 0, got {self.model.num_parameters}")
        numbers = [(f"predicted.{f.name}", getattr(self.predicted, f.name)) for f in dataclasses.fields(Prediction)
                   if isinstance(getattr(self.predicted, f.name), float)]
        numbers += [(f"predicted.stages[{i}].{f.name}", getattr(stage, f.name))
                    for i, stage in enumerate(self.predicted.stages) for f in dataclasses.fields(stage)]
        numbers += [(f"layers[{i}].{name}", getattr(layer, name)) for i, layer in enumerate(self.layers)
                    for name in ("predicted_time_ms", "predicted_memory_mib")]
        for name, value in numbers:
            if not math.isfinite(value) or value < 0:
                raise PlanError(f"{source}: field '{name}' must be a finite number >= 0, got {value!r}; "
                                "re-run `meshplan plan` to recompute predictions")
        try:
            cluster = Cluster.from_dict(self.cluster, source=f"{source}: cluster")
        except ClusterError as err:
            raise PlanError(f"{source}: field 'cluster' is not a valid cluster profile: {err}") from err
        if cluster.world_size < self.world_size:
            raise PlanError(f"{source}: world_size {self.world_size} is more than the plan's cluster holds "
                            f"({cluster.num_nodes} node(s) x {cluster.devices_per_node} devices); "
                            "re-run `meshplan plan` for this world size")

    def _validate_pipeline(self, source: str) -> None:
        mesh, pipe = self.mesh, self.pipeline
        _check_choice(source, "pipeline.schedule", pipe.schedule, SCHEDULES)
        if pipe.num_microbatches < 1 or pipe.virtual_stages < 1:
            raise PlanError(f"{source}: pipeline.num_microbatches and pipeline.virtual_stages must be >= 1")
        if (mesh.pp == 1) != (pipe.schedule == "none"):
            raise PlanError(f"{source}: pipeline.schedule {pipe.schedule!r} does not fit pp={mesh.pp}: use "
                            "'none' exactly when pp = 1, else gpipe, 1f1b or interleaved_1f1b")
        if (pipe.virtual_stages > 1) != (pipe.schedule == "interleaved_1f1b"):
            raise PlanError(f"{source}: pipeline.virtual_stages={pipe.virtual_stages} needs schedule "
                            "'interleaved_1f1b' (and that schedule needs virtual_stages >= 2)")
        if mesh.pp > 1 and pipe.num_microbatches < mesh.pp:
            raise PlanError(f"{source}: pipeline.num_microbatches={pipe.num_microbatches} is less than "
                            f"pp={mesh.pp}; a pipeline needs at least one micro-batch per stage")
        if pipe.schedule == "interleaved_1f1b" and pipe.num_microbatches % mesh.pp:
            raise PlanError(f"{source}: interleaved_1f1b needs num_microbatches ({pipe.num_microbatches}) to be "
                            f"a multiple of pp={mesh.pp}")
        per_step = mesh.dp * pipe.num_microbatches
        if self.model.global_batch_size % per_step:
            raise PlanError(f"{source}: global_batch_size {self.model.global_batch_size} is not divisible by "
                            f"dp={mesh.dp} x num_microbatches={pipe.num_microbatches} = {per_step}")

    def to_yaml(self) -> str:
        return yaml.safe_dump(to_plain(self), sort_keys=False, default_flow_style=None, width=100)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan atomically (temp file + rename), so a crash never leaves half a plan."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(self.to_yaml())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # `--out DIR` or a full disk: leave nothing behind
            raise

    @classmethod
    def from_yaml(cls, text: str, source: str = "plan") -> Plan:
        try:
            data = load_bounded(text, "plan")
        except yaml.YAMLError as err:
            raise PlanError(f"{source}: not valid YAML: {_bounded(str(err))}") from err
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
            text = read_bounded_text(path, "plan file")
        except yaml.YAMLError as err:
            raise PlanError(f"{path}: {err}") from err
        except OSError as err:
            raise PlanError(f"{path}: cannot read plan file: {err.strerror}") from err
        except UnicodeDecodeError as err:
            raise PlanError(f"{path}: not a text (UTF-8) file, so not a plan YAML: {err.reason} at byte "
                            f"{err.start}") from err
        return cls.from_yaml(text, str(path))


def _bounded(text: str, limit: int = 1500) -> str:
    """`text` cut to `limit` characters (a YAML error quotes the document around its mark)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit:,} more characters)"


def _check_choice(source: str, field_name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise PlanError(f"{source}: field '{field_name}' must be one of {list(allowed)}, got {brief(value)}")
