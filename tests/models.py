"""Small MODEL functions for tests: a plain MLP, models that reuse a layer or the input, a GPT with tied weights."""

import importlib.util
from pathlib import Path

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


class ReusedLinear(nn.Module):
    """`b` runs twice, first of all and again after `a`: a layer no pipeline stage can start with."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(self.b(x))))


def build_reused_linear() -> ModelSpec:
    def make_batch(batch_size: int, step: int):
        x = torch.randn(batch_size, 8, generator=torch.Generator().manual_seed(step))
        return (x,), x[:, :4]

    return ModelSpec(model=ReusedLinear(), make_batch=make_batch, loss_fn=F.mse_loss, global_batch_size=8)


def _example_gpt():
    path = Path(__file__).resolve().parents[1] / "examples" / "gpt.py"
    module_spec = importlib.util.spec_from_file_location("meshplan_tests_example_gpt", path)
    gpt = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(gpt)
    return gpt


def build_tied_gpt() -> ModelSpec:
    """examples/gpt.py's GPT with the head tied to the token embedding (one parameter, used first and last)."""
    spec = _example_gpt().build_gpt()
    spec.model.head.weight = spec.model.wte.weight
    return spec


def build_wide_vocab_gpt() -> ModelSpec:
    """examples/gpt.py's GPT with a vocabulary of 8192: the embedding and the head hold most of the weights."""
    return _example_gpt().build_gpt(vocab=8192)


def build_mse_head_gpt() -> ModelSpec:
    """examples/gpt.py's GPT trained with a mean-squared error on its logits: no cross-entropy for
    loss_parallel, so its head cannot be vocabulary-parallel."""
    spec = _example_gpt().build_gpt()
    spec.loss_fn = lambda logits, targets: F.mse_loss(logits, F.one_hot(targets, logits.shape[-1]).to(logits.dtype))
    return spec


class InputSkip(nn.Module):
    """The model input is added again after `b`: with `b` and `c` on a later stage, that stage needs it."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x)) + x)


def build_input_skip() -> ModelSpec:
    def make_batch(batch_size: int, step: int):
        x = torch.randn(batch_size, 8, generator=torch.Generator().manual_seed(step))
        return (x,), x[:, :4]

    return ModelSpec(model=InputSkip(), make_batch=make_batch, loss_fn=F.mse_loss, global_batch_size=8)


class LongResidual(nn.Module):
    """`a`'s output feeds `b` and is added again after `d`: cut into four stages, it skips two stages and its
    gradient must come back through them."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.d(torch.tanh(self.c(torch.tanh(self.b(h)))) + h)


def build_long_residual() -> ModelSpec:
    def make_batch(batch_size: int, step: int):
        x = torch.randn(batch_size, 8, generator=torch.Generator().manual_seed(step))
        return (x,), x[:, :4]

    return ModelSpec(model=LongResidual(), make_batch=make_batch, loss_fn=F.mse_loss, global_batch_size=8)
