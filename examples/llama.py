"""A Llama-style decoder (RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP) as a meshplan MODEL.

    meshplan plan examples/llama.py:build_llama --cluster cpu --world-size 4 --out plan.yaml
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meshplan import ModelSpec


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding on the last dimension (pairs of halves, as in Llama)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = hidden // num_heads
        self.q_proj = nn.Linear(hidden, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(batch, seq, -1))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, intermediate: int):
        super().__init__()
        self.input_norm = nn.RMSNorm(hidden)
        self.attn = Attention(hidden, num_heads, num_kv_heads)
        self.post_attn_norm = nn.RMSNorm(hidden)
        self.mlp = SwiGLU(hidden, intermediate)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), cos, sin)
        return x + self.mlp(self.post_attn_norm(x))


class Llama(nn.Module):
    def __init__(self, vocab: int, hidden: int, num_heads: int, num_kv_heads: int, intermediate: int,
                 num_layers: int, rope_base: float = 10000.0):
        super().__init__()
        self.head_dim = hidden // num_heads
        self.rope_base = rope_base
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(DecoderLayer(hidden, num_heads, num_kv_heads, intermediate)
                                    for _ in range(num_layers))
        self.norm = nn.RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device, dtype=torch.float32)
        inv_freq = self.rope_base ** (-torch.arange(0, self.head_dim, 2, device=idx.device,
                                                    dtype=torch.float32) / self.head_dim)
        angles = torch.outer(positions, inv_freq).repeat(1, 2)
        cos, sin = angles.cos().to(self.embed.weight.dtype), angles.sin().to(self.embed.weight.dtype)
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def build_llama(vocab: int = 256, seq_len: int = 32, hidden: int = 64, num_heads: int = 4, num_kv_heads: int = 2,
                intermediate: int = 176, num_layers: int = 4, global_batch_size: int = 8) -> ModelSpec:
    """A Llama-style model on the same synthetic arithmetic-sequence task as examples/gpt.py."""
    model = Llama(vocab, hidden, num_heads, num_kv_heads, intermediate, num_layers)

    def make_batch(batch_size: int, step: int):
        gen = torch.Generator().manual_seed(1000 + step)
        start = torch.randint(0, vocab, (batch_size, 1), generator=gen)
        stride = torch.randint(1, 4, (batch_size, 1), generator=gen)
        tokens = (start + stride * torch.arange(seq_len + 1)) % vocab
        return (tokens[:, :-1],), tokens[:, 1:]

    return ModelSpec(model=model, make_batch=make_batch, loss_fn=lm_loss,
                     global_batch_size=global_batch_size, learning_rate=1e-3)
