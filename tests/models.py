"""Small MODEL functions for tests (a plain MLP)."""

import torch
import torch.nn.functional as F
from torch import nn

from meshplan import ModelSpec


def build_mlp() -> ModelSpec:
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))

    def make_batch(batch_size: int, step: int):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(batch_size, 16, generator=gen)
        return (x,), x[:, :4].sum(dim=1, keepdim=True).repeat(1, 4)

    return ModelSpec(model=model, make_batch=make_batch, loss_fn=F.mse_loss, global_batch_size=8)
