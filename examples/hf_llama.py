"""Hugging Face transformers' Llama (LlamaForCausalLM) as a meshplan MODEL: a tiny config with random weights,
built from `LlamaConfig` (nothing is downloaded). Rotary embeddings and the causal mask are transformers' own.

    meshplan plan examples/hf_llama.py:build_hf_llama --cluster cpu --world-size 4 --out plan.yaml
    meshplan execute plan.yaml --steps 5
    python examples/hf_llama.py [--world-size 4] [--steps 5]   # both steps from Python

To train a real checkpoint, build the same wrapper around `LlamaForCausalLM.from_pretrained(...)` (or around a
model made from its config under `torch.device("meta")` when planning).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from meshplan import ModelSpec


class LlamaLogits(nn.Module):
    """LlamaForCausalLM whose forward takes token ids and returns the logits (no KV cache while training)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.llama = LlamaForCausalLM(config)
        # transformers' LlamaRotaryEmbedding.forward is wrapped in @torch.no_grad(). torch.export (which the
        # pipeline splitter uses) turns that into a `wrap_with_set_grad_enabled` submodule, and the split
        # stage then calls the rotary module once without arguments and fails ("Expected positional argument
        # for parameter unsqueeze_default"). Its inputs (positions, the inv_freq buffer) never need gradients,
        # so running the undecorated forward computes the same tables.
        rotary = self.llama.model.rotary_emb
        rotary.forward = types.MethodType(type(rotary).forward.__wrapped__, rotary)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.llama(input_ids=input_ids, use_cache=False).logits


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def build_hf_llama(vocab: int = 128, seq_len: int = 16, hidden: int = 64, num_layers: int = 2,
                   global_batch_size: int = 8) -> ModelSpec:
    """Llama with 4 query heads, 2 key/value heads (grouped-query attention), SwiGLU MLP of 128, untied head,
    on a synthetic next-token task (arithmetic token rows, so the loss falls)."""
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=seq_len, tie_word_embeddings=False, use_cache=False)
    config._attn_implementation = "eager"

    def make_batch(batch_size: int, step: int):
        gen = torch.Generator().manual_seed(1000 + step)
        start = torch.randint(0, vocab, (batch_size, 1), generator=gen)
        stride = torch.randint(1, 4, (batch_size, 1), generator=gen)
        tokens = (start + stride * torch.arange(seq_len + 1)) % vocab
        return (tokens[:, :-1],), tokens[:, 1:]

    return ModelSpec(model=LlamaLogits(config), make_batch=make_batch, loss_fn=lm_loss,
                     global_batch_size=global_batch_size, learning_rate=1e-3)


def main() -> None:
    """Plan for --world-size CPU ranks, print the plan's summary, train --steps steps and print the report."""
    import argparse
    from pathlib import Path

    from meshplan import execute, plan

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    chosen = plan(f"{Path(__file__).resolve()}:build_hf_llama", cluster="cpu", world_size=args.world_size)
    mesh = chosen.mesh
    print(f"plan: pp={mesh.pp} x dp={mesh.dp} x tp={mesh.tp}, {chosen.data_parallel.kind}, "
          f"predicted {chosen.predicted.step_time_ms:.2f} ms per step")
    report = execute(chosen, steps=args.steps, quiet=True)
    print(f"trained {args.steps} steps: loss {report.losses[0]:.4f} -> {report.losses[-1]:.4f}")
    print(report.format())


if __name__ == "__main__":
    main()
