"""Bytes per device: model state (parameters, gradients, optimizer states) with ZeRO sharding, transformer
activations (Korthikanti et al. 2022), pipeline in-flight micro-batches and bubble, collective buffers.

Per parameter: parameters and gradients take dtype_bytes(param_dtype) each; optimizer states take
  adam / adamw    8 B (two float32 moments) + 4 B float32 master copy when master_weights
  sgd_momentum    4 B (one float32 momentum buffer) + 4 B master copy when master_weights
  sgd             0 B                                + 4 B master copy when master_weights
Mixed-precision AdamW (bf16/fp16 params and grads, fp32 master copy and moments) is 2 + 2 + 12 = 16 B/param,
the K = 12 of the ZeRO paper (Rajbhandari et al., 2020, section 3.1).

ZeRO sharding over N data-parallel ranks (ceil division, so every rank holds the largest shard):
  stage 0 (DDP) nothing sharded; 1 optimizer states / N; 2 also gradients / N; 3 also parameters / N (FSDP).

Blind spots of the model-state functions: activations and temporary buffers are separate functions below;
the optimizer's scratch space, allocator fragmentation and the runtime context are not counted.
"""

from dataclasses import dataclass

from .dtypes import dtype_bytes

__all__ = [
    "OPTIMIZER_STATE_BYTES_PER_PARAM",
    "PIPELINE_SCHEDULES",
    "ModelStateBytes",
    "collective_buffer_bytes",
    "in_flight_microbatches",
    "model_state_bytes",
    "pipeline_bubble_fraction",
    "sharded_model_state_bytes",
    "transformer_layer_activation_bytes",
]

PIPELINE_SCHEDULES = ("none", "gpipe", "1f1b", "interleaved_1f1b")
RECOMPUTE_MODES = ("none", "selective", "full")

OPTIMIZER_STATE_BYTES_PER_PARAM: dict[str, int] = {"adam": 8, "adamw": 8, "sgd": 0, "sgd_momentum": 4}
"""float32 optimizer-state bytes per parameter, without a master copy."""

_MASTER_COPY_BYTES_PER_PARAM = 4  # float32 copy of the weights kept by mixed-precision training
_ZERO_STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class ModelStateBytes:
    """Model state of one device, in bytes."""

    parameters_bytes: int
    """Parameters in their training dtype."""

    gradients_bytes: int
    """Gradients, in the parameter dtype."""

    optimizer_states_bytes: int
    """Optimizer states, including the float32 master copy of the weights when there is one."""

    @property
    def total_bytes(self) -> int:
        """parameters_bytes + gradients_bytes + optimizer_states_bytes."""
        return self.parameters_bytes + self.gradients_bytes + self.optimizer_states_bytes


def _check_int(field: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{field} must be an integer >= {minimum}, got {value!r}")
    return value


def model_state_bytes(num_params: int, param_dtype: str = "float32", optimizer: str = "adamw",
                      master_weights: bool = False) -> ModelStateBytes:
    """Unsharded model state of `num_params` parameters (see the module docstring for bytes per parameter).

    master_weights adds a float32 copy of the weights to the optimizer states; it is counted whenever asked
    for, even with float32 parameters where it would be redundant.
    """
    num_params = _check_int("num_params", num_params, 0)
    if optimizer not in OPTIMIZER_STATE_BYTES_PER_PARAM:
        raise ValueError(
            f"unknown optimizer {optimizer!r}; "
            f"supported optimizers: {', '.join(OPTIMIZER_STATE_BYTES_PER_PARAM)}"
        )
    element_bytes = dtype_bytes(param_dtype)
    state_per_param = OPTIMIZER_STATE_BYTES_PER_PARAM[optimizer]
    if master_weights:
        state_per_param += _MASTER_COPY_BYTES_PER_PARAM
    return ModelStateBytes(
        parameters_bytes=num_params * element_bytes,
        gradients_bytes=num_params * element_bytes,
        optimizer_states_bytes=num_params * state_per_param,
    )


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def sharded_model_state_bytes(state: ModelStateBytes, shard_degree: int, zero_stage: int) -> ModelStateBytes:
    """Model state one rank holds when `state` is sharded over `shard_degree` ranks at ZeRO `zero_stage`.

    Stage 0 keeps everything; 1 divides optimizer states by shard_degree; 2 also gradients; 3 also
    parameters. Each sharded part is ceil(bytes / shard_degree).
    """
    shard_degree = _check_int("shard_degree", shard_degree, 1)
    if isinstance(zero_stage, bool) or zero_stage not in _ZERO_STAGES:
        raise ValueError(f"zero_stage must be one of {_ZERO_STAGES}, got {zero_stage!r}")

    def part(value: int, sharded_from_stage: int) -> int:
        return _ceil_div(value, shard_degree) if zero_stage >= sharded_from_stage else value

    return ModelStateBytes(
        parameters_bytes=part(state.parameters_bytes, 3),
        gradients_bytes=part(state.gradients_bytes, 2),
        optimizer_states_bytes=part(state.optimizer_states_bytes, 1),
    )


# ----------------------------------------------------------------------------------------------------------
# Activations of a transformer layer: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
# Transformer Models", section 4 and Table 2.


def transformer_layer_activation_bytes(s: int, b: int, h: int, a: int, t: int = 1, sequence_parallel: bool = False,
                                       recompute: str = "none") -> float:
    """Bytes of activations one transformer layer keeps for backward, per device (Korthikanti et al. 2022).

    s sequence length, b micro-batch size, h hidden size, a attention heads, t tensor-parallel degree.
      recompute="none":      sbh (34 + 5as/h)                      t = 1
                             sbh (10 + 24/t + 5as/(ht))             tensor parallel (LayerNorms, dropouts and
                                                                    linear inputs outside TP stay whole)
                             sbh/t (34 + 5as/h)                     tensor + sequence parallel
      recompute="selective": sbh (10 + 24/t), or 34 sbh / t with sequence parallel (attention's s^2 terms
                             are recomputed)
      recompute="full":      2 sbh (only the layer input is kept), 2 sbh / t with sequence parallel
    Assumptions of the paper: 16-bit activations (2 bytes), 1-byte dropout masks, attention scores and
    softmax materialised (no flash attention), a 4h MLP with GeLU, LayerNorm. Blind spots: LayerNorm's
    float32 mean and rstd (8 bytes per token), the attention mask, and the recomputation workspace of the
    layer being recomputed are not counted.
    """
    for name, value in (("s", s), ("b", b), ("h", h), ("a", a), ("t", t)):
        _check_int(name, value, 1)
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE_MODES)}, got {recompute!r}")
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh / (t if sequence_parallel else 1)
    attention = 0 if recompute == "selective" else 5 * a * s / h
    if sequence_parallel:
        return sbh / t * (34 + attention)
    return sbh * (10 + 24 / t + attention / t)


# ----------------------------------------------------------------------------------------------------------
# Pipelines.


def _check_schedule(schedule: str, pp: int, num_microbatches: int, virtual_stages: int) -> None:
    if schedule not in PIPELINE_SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(PIPELINE_SCHEDULES)}, got {schedule!r}")
    _check_int("pp", pp, 1)
    _check_int("num_microbatches", num_microbatches, 1)
    _check_int("virtual_stages", virtual_stages, 1)
    if virtual_stages > 1 and schedule != "interleaved_1f1b":
        raise ValueError(f"virtual_stages={virtual_stages} needs schedule 'interleaved_1f1b', got {schedule!r}")


def in_flight_microbatches(schedule: str, pp: int, stage: int, num_microbatches: int,
                           virtual_stages: int = 1) -> float:
    """Micro-batches whose activations pipeline stage `stage` (0-based) holds at its peak, in units of one
    micro-batch's activations for the whole stage.

      none / gpipe       num_microbatches (all forwards run before any backward; "none" = gradient
                         accumulation, which frees each micro-batch before the next: 1)
      1f1b               min(pp - stage, m): stage s runs pp - s warm-up forwards before its first backward
      interleaved_1f1b   min(2 (pp - s - 1) + (v - 1) pp + 1, v m) / v  chunk-micro-batches, each 1/v of the
                         stage: Megatron-LM's warm-up count (schedules.py, forward_backward_pipelining_with_
                         interleaving) plus the one in steady state; stage 0 holds pp (1 + (pp-1)/(pp v)),
                         Korthikanti et al. 2022 section 4.2.3.
    Blind spot: the last stage's loss/logits buffers and p2p receive buffers are not counted.
    """
    _check_schedule(schedule, pp, num_microbatches, virtual_stages)
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < pp:
        raise ValueError(f"stage must be an integer in [0, {pp}), got {stage!r}")
    m, v = num_microbatches, virtual_stages
    if schedule == "none":
        return 1.0
    if schedule == "gpipe":
        return float(m)
    if schedule == "1f1b":
        return float(min(pp - stage, m))
    return min(2 * (pp - stage - 1) + (v - 1) * pp + 1, v * m) / v


def pipeline_bubble_fraction(schedule: str, pp: int, num_microbatches: int, virtual_stages: int = 1) -> float:
    """Share of the pipelined step that devices sit idle: bubble / (ideal work + bubble).

      gpipe, 1f1b        (pp - 1) / (m + pp - 1)       (Huang et al. 2019 GPipe; Narayanan et al. 2021
                                                         section 2.2: bubble/ideal = (p-1)/m)
      interleaved_1f1b   (pp - 1) / (v m + pp - 1)     (Narayanan et al. 2021 section 2.2: the bubble shrinks
                                                         by the number of model chunks v)
      none               0
    Multiply the bubble-free step time by 1 / (1 - fraction) to get the pipelined one. Blind spots: equal
    stage times and free p2p (p2p is priced separately); warm-up/cool-down imbalance of real stages.
    """
    _check_schedule(schedule, pp, num_microbatches, virtual_stages)
    if schedule == "none" or pp == 1:
        return 0.0
    chunks = virtual_stages * num_microbatches if schedule == "interleaved_1f1b" else num_microbatches
    return (pp - 1) / (chunks + pp - 1)


# ----------------------------------------------------------------------------------------------------------
# Temporary buffers of collectives.


def collective_buffer_bytes(collective: str, message_bytes: int, group_size: int) -> int:
    """Extra device memory a collective allocates while it runs (bytes), beside its sharded inputs/outputs.

      all_gather       message_bytes                  the gathered (unsharded) output, e.g. an FSDP unit's
                                                      parameters while its layer runs (message = full size)
      reduce_scatter   message_bytes                  the unsharded input (FSDP's full-size gradient of one
                                                      unit) before it is reduced to 1/n
      all_reduce       message_bytes                  one flattened bucket copy (DDP gradient buckets)
      all_to_all       message_bytes                  the receive buffer
      point_to_point   message_bytes                  the receive buffer
    A group of one allocates nothing. Blind spots: NCCL's own fixed channel buffers (a few hundred MiB per
    communicator on GPUs) belong in the profile's usable_memory_fraction; FSDP prefetching keeps two units'
    all-gather buffers alive, which the caller multiplies in.
    """
    if collective not in ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "point_to_point"):
        raise ValueError(f"unknown collective {collective!r}")
    _check_int("message_bytes", message_bytes, 0)
    _check_int("group_size", group_size, 1)
    if group_size == 1 and collective != "point_to_point":
        return 0
    return message_bytes
