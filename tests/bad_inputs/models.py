"""MODEL functions a user might hand `meshplan plan` that cannot be planned: each must end in one clear error."""

import torch
import torch.nn.functional as F
from torch import nn

from meshplan import ModelSpec


def _batch(batch_size: int, step: int):
    x = torch.randn(batch_size, 8, generator=torch.Generator().manual_seed(step))
    return (x,), x[:, :4]


class DataDependent(nn.Module):
    """Python control flow on a tensor's value: no tracer can follow it on fake tensors."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) if x.sum() > 0 else self.b(x)


def build_data_dependent() -> ModelSpec:
    return ModelSpec(model=DataDependent(), make_batch=_batch, loss_fn=F.mse_loss, global_batch_size=8)


def build_shape_mismatch() -> ModelSpec:
    """The batch does not fit the first layer (16 features expected, 8 given)."""
    return ModelSpec(model=nn.Sequential(nn.Linear(16, 4)), make_batch=_batch, loss_fn=F.mse_loss,
                     global_batch_size=8)


def build_not_a_spec():
    return nn.Linear(8, 4)


def build_raises() -> ModelSpec:
    raise RuntimeError("the model's own code failed: config file model.json not found")


def build_zero_batch() -> ModelSpec:
    return ModelSpec(model=nn.Linear(8, 4), make_batch=_batch, loss_fn=F.mse_loss, global_batch_size=0)


def build_needs_arguments(hidden: int) -> ModelSpec:
    return ModelSpec(model=nn.Linear(8, hidden), make_batch=_batch, loss_fn=F.mse_loss, global_batch_size=8)
