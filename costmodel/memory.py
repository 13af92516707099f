"""Bytes of model state (parameters, gradients, optimizer states) per device, with ZeRO sharding.

Per parameter: parameters and gradients take dtype_bytes(param_dtype) each; optimizer states take
  adam / adamw    8 B (two float32 moments) + 4 B float32 master copy when master_weights
  sgd_momentum    4 B (one float32 momentum buffer) + 4 B master copy when master_weights
  sgd             0 B                                + 4 B master copy when master_weights
Mixed-precision AdamW (bf16/fp16 params and grads, fp32 master copy and moments) is 2 + 2 + 12 = 16 B/param,
the K = 12 of the ZeRO paper (Rajbhandari et al., 2020, section 3.1).

ZeRO sharding over N data-parallel ranks (ceil division, so every rank holds the largest shard):
  stage 0 (DDP) nothing sharded; 1 optimizer states / N; 2 also gradients / N; 3 also parameters / N (FSDP).

Blind spots: activations, temporary buffers (gathered ZeRO-3 parameters, gradient buckets, the optimizer's
scratch space), allocator fragmentation and the runtime context are not counted here.
"""

from dataclasses import dataclass

from .dtypes import dtype_bytes

__all__ = [
    "OPTIMIZER_STATE_BYTES_PER_PARAM",
    "ModelStateBytes",
    "model_state_bytes",
    "sharded_model_state_bytes",
]

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
