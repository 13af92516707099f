"""MODEL functions a user might hand `meshplan plan` that cannot be planned: each must end in one clear error."""

import importlib.util
import sys
from pathlib import Path

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


def build_make_batch_dict() -> ModelSpec:
    """make_batch returns a dict (as a Hugging Face collator does), not (inputs, targets)."""
    def make_batch(batch_size: int, step: int):
        x = torch.randn(batch_size, 8)
        return {"input": x, "labels": x[:, :4]}

    return ModelSpec(model=nn.Linear(8, 4), make_batch=make_batch, loss_fn=F.mse_loss, global_batch_size=8)


def build_make_batch_raises() -> ModelSpec:
    def make_batch(batch_size: int, step: int):
        return {"x": torch.randn(batch_size, 8)}["input_ids"], None

    return ModelSpec(model=nn.Linear(8, 4), make_batch=make_batch, loss_fn=F.mse_loss, global_batch_size=8)


def build_make_batch_tensor() -> ModelSpec:
    """make_batch returns the input tensor alone."""
    return ModelSpec(model=nn.Linear(8, 4), make_batch=lambda batch_size, step: torch.randn(batch_size, 8),
                     loss_fn=F.mse_loss, global_batch_size=8)


def build_calls_exit() -> ModelSpec:
    """A MODEL function that ends the process (a script's `main()` handed to meshplan by mistake)."""
    sys.exit(3)


def build_three_heads() -> ModelSpec:
    """The example GPT with 3 attention heads (hidden 48): tensor parallelism over 2 ranks splits a head."""
    path = Path(__file__).resolve().parents[2] / "examples" / "gpt.py"
    module_spec = importlib.util.spec_from_file_location("meshplan_bad_inputs_gpt", path)
    gpt = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(gpt)
    return gpt.build_gpt(hidden=48, num_heads=3, num_layers=2)
