"""The traced graph of a GPT block saves what Korthikanti et al. 2022 count: s*b*h*(34 + 5*a*s/h) bytes.

The paper's count ("Reducing Activation Recomputation in Large Transformer Models", section 4.1) assumes
16-bit activations, 1-byte dropout masks, attention scores and softmax materialised (no flash attention), a 4h
GeLU MLP and LayerNorm. The block below is built so those assumptions hold: float16 parameters on the meta
device, dropout after the attention softmax, after the attention projection and after the MLP, and explicit
softmax(QK^T / sqrt(d)) V instead of scaled_dot_product_attention; no causal mask (a saved boolean mask would
add s^2 bytes the paper does not count). Dropout goes through the fused kernel (see FusedDropout). The
remaining difference is LayerNorm's float32 mean and rstd (2 x 4 bytes per token per LayerNorm), which the
paper leaves out: 16 / (h * (34 + 5as/h)) of the total, far below the 5 % tolerance.

LayerFacts.saved_bytes comes from planner.model_graph (what forward values backward nodes read, counted once
per storage), and LayerFacts.tp_saved_bytes is the part inside tensor-parallel units, which a tp-way split
divides by t: the paper's sbh(10 + 24/t + 5as/(ht)).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from costmodel import transformer_layer_activation_bytes
from meshplan import ModelSpec
from planner.model_graph import build_model_graph

S, B, H, A = 64, 2, 128, 4  # 5as/h = 10: the attention term is a large share, so both terms are tested


class FusedDropout(nn.Module):
    """Dropout through the fused kernel CUDA uses (`native_dropout`), which saves a 1-byte boolean mask.

    `nn.Dropout` on CPU and meta tensors takes ATen's composite path (`bernoulli_` into a tensor of the
    input's dtype, then `div_` and `mul`), which saves a 2-byte float16 mask: what a CPU run really keeps,
    but not the paper's (GPU) assumption of 1 byte per element.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.native_dropout(x, self.p, self.training)[0]


class PaperAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.attn_drop = FusedDropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        d = h // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.heads, d).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(d))
        probs = self.attn_drop(F.softmax(scores, dim=-1))
        y = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, h)
        return self.proj(y)


class PaperBlock(nn.Module):
    """Pre-norm GPT block with the paper's dropouts: attention probs, attention output, MLP output."""

    def __init__(self, hidden: int, heads: int, dropout: float = 0.1):
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden)
        self.attn = PaperAttention(hidden, heads, dropout)
        self.drop_1 = FusedDropout(dropout)
        self.ln_2 = nn.LayerNorm(hidden)
        self.fc = nn.Linear(hidden, 4 * hidden)
        self.proj = nn.Linear(4 * hidden, hidden)
        self.drop_2 = FusedDropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_1(self.attn(self.ln_1(x)))
        return x + self.drop_2(self.proj(F.gelu(self.fc(self.ln_2(x)))))


class Stack(nn.Module):
    """Blocks then a final LayerNorm, as in GPT: every block's output is saved by the next LayerNorm."""

    def __init__(self, num_layers: int):
        super().__init__()
        self.blocks = nn.ModuleList(PaperBlock(H, A) for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)


def build_stack() -> ModelSpec:
    with torch.device("meta"):
        model = Stack(3).to(torch.float16)

    def make_batch(batch_size: int, step: int):
        return (torch.zeros(batch_size, S, H, dtype=torch.float16),), torch.zeros(batch_size)

    # sum() saves nothing for backward, so the loss adds no activations to the last block
    return ModelSpec(model=model, make_batch=make_batch, loss_fn=lambda out, targets: out.float().sum(),
                     global_batch_size=B)


@pytest.fixture(scope="module")
def block_facts():
    graph = build_model_graph(build_stack())
    layers = {layer.path: layer for layer in graph.layers}
    assert list(layers) == ["blocks.0", "blocks.1", "blocks.2", "ln_f"]
    # A layer's saved bytes include its output (saved by the next LayerNorm) instead of its input (counted in
    # the previous layer), so any block after the first holds exactly one layer's worth. (The planner traces
    # the first two blocks of an identical stack and copies the second's facts to the rest.)
    return layers["blocks.1"]


def test_traced_block_matches_paper(block_facts):
    expected = transformer_layer_activation_bytes(S, B, H, A)
    assert expected == S * B * H * (34 + 5 * A * S / H)
    assert block_facts.saved_bytes == pytest.approx(expected, rel=0.05)
    # the only known extra is LayerNorm's float32 mean and rstd: 2 LayerNorms x 2 x 4 bytes per token
    assert block_facts.saved_bytes - expected == 2 * 2 * 4 * S * B


@pytest.mark.parametrize("t", [2, 4, 8])
def test_traced_block_tensor_parallel_matches_paper(block_facts, t):
    # q/k/v -> attn.proj and fc -> proj are the two Megatron units
    assert len(block_facts.tp_units) == 2
    outside = block_facts.saved_bytes - block_facts.tp_saved_bytes
    per_rank = outside + block_facts.tp_saved_bytes / t
    expected = transformer_layer_activation_bytes(S, B, H, A, t=t)
    assert per_rank == pytest.approx(expected, rel=0.05)
    # split as the paper does: 10 sbh outside the units, 24 sbh + 5 a s^2 b inside
    sbh = S * B * H
    assert outside - 2 * 2 * 4 * S * B == 10 * sbh
    assert block_facts.tp_saved_bytes == 24 * sbh + 5 * A * S * S * B


def test_full_recompute_keeps_the_layer_input():
    # full recomputation keeps only the block input: 2 sbh (float16), which is the traced input's size
    assert transformer_layer_activation_bytes(S, B, H, A, recompute="full") == S * B * H * 2
