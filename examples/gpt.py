"""A small GPT (pre-norm decoder, separate q/k/v projections, GELU MLP) as a meshplan MODEL.

    meshplan plan examples/gpt.py:build_gpt --cluster cpu --world-size 4 --out plan.yaml
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from meshplan import ModelSpec


class CausalSelfAttention(nn.Module):
    def __init__(self, hidden: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(hidden, hidden, bias=False)
        self.k = nn.Linear(hidden, hidden, bias=False)
        self.v = nn.Linear(hidden, hidden, bias=False)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        head_dim = hidden // self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seq, self.num_heads, head_dim).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, hidden))


class MLP(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.fc = nn.Linear(hidden, 4 * hidden)
        self.proj = nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, hidden: int, num_heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden)
        self.attn = CausalSelfAttention(hidden, num_heads)
        self.ln_2 = nn.LayerNorm(hidden)
        self.mlp = MLP(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, seq_len: int, hidden: int, num_heads: int, num_layers: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, hidden)
        self.wpe = nn.Embedding(seq_len, hidden)
        self.blocks = nn.ModuleList(Block(hidden, num_heads) for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * num_layers) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def build_gpt(vocab: int = 256, seq_len: int = 32, hidden: int = 64, num_heads: int = 4, num_layers: int = 4,
              global_batch_size: int = 8) -> ModelSpec:
    """A GPT on a synthetic next-token task: arithmetic token sequences (random start and stride), so the
    next token is predictable and the loss falls."""
    model = GPT(vocab, seq_len, hidden, num_heads, num_layers)

    def make_batch(batch_size: int, step: int):
        gen = torch.Generator().manual_seed(1000 + step)
        start = torch.randint(0, vocab, (batch_size, 1), generator=gen)
        stride = torch.randint(1, 4, (batch_size, 1), generator=gen)
        tokens = (start + stride * torch.arange(seq_len + 1)) % vocab
        return (tokens[:, :-1],), tokens[:, 1:]

    return ModelSpec(model=model, make_batch=make_batch, loss_fn=lm_loss,
                     global_batch_size=global_batch_size, learning_rate=1e-3)
