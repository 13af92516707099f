"""Hugging Face transformers models as meshplan MODELs: tiny configs, random weights, nothing downloaded.

Each builder makes the model from its config class (so the code that runs is transformers' own: GPT-2's Conv1D
and tied head, BERT's token types and padding mask, ViT's Conv2d patch embedding), wraps it so forward returns
one tensor (the logits), and gives it a deterministic synthetic task. Llama and ResNet live in examples/.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification

from meshplan import ModelSpec

VOCAB = 128
SEQ_LEN = 16


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def arithmetic_tokens(batch_size: int, step: int, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """Token rows `start, start + stride, ...` mod VOCAB: a next-token task a model can learn."""
    gen = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, VOCAB, (batch_size, 1), generator=gen)
    stride = torch.randint(1, 4, (batch_size, 1), generator=gen)
    return (start + stride * torch.arange(seq_len + 1)) % VOCAB


class GPT2Logits(nn.Module):
    """GPT2LMHeadModel whose forward returns the logits (the head is tied to the token embedding)."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.gpt = GPT2LMHeadModel(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.gpt(input_ids=input_ids, use_cache=False).logits


def build_gpt2() -> ModelSpec:
    """Transformers GPT-2, 2 layers, hidden 64, 4 heads, no dropout (parity needs deterministic forwards)."""
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ_LEN, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "eager"

    def make_batch(batch_size: int, step: int):
        tokens = arithmetic_tokens(batch_size, step)
        return (tokens[:, :-1],), tokens[:, 1:]

    return ModelSpec(model=GPT2Logits(config), make_batch=make_batch, loss_fn=lm_loss, global_batch_size=8)


class BertLogits(nn.Module):
    """BertForMaskedLM taking (input_ids, token_type_ids, attention_mask) and returning the MLM logits."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.bert = BertForMaskedLM(config)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask).logits


def build_bert() -> ModelSpec:
    """Transformers BERT (masked LM), 2 layers, hidden 64: sentence pairs (token types 0 then 1), the last
    positions of some rows padded (attention mask 0), the task to predict every token's successor."""
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=SEQ_LEN, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    config._attn_implementation = "eager"

    def make_batch(batch_size: int, step: int):
        tokens = arithmetic_tokens(batch_size, step)
        token_types = (torch.arange(SEQ_LEN) >= SEQ_LEN // 2).long().expand(batch_size, SEQ_LEN)
        lengths = SEQ_LEN - torch.arange(batch_size) % 3  # rows 1, 2, 4, 5, ... end in padding
        attention_mask = (torch.arange(SEQ_LEN) < lengths[:, None]).long()
        return (tokens[:, :-1], token_types.clone(), attention_mask), tokens[:, 1:]

    return ModelSpec(model=BertLogits(config), make_batch=make_batch, loss_fn=lm_loss, global_batch_size=8)


class ViTLogits(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.vit = ViTForImageClassification(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values=pixel_values).logits


def image_batch(batch_size: int, step: int, image_size: int, num_classes: int):
    """Random images whose class is the quadrant holding the brightest patch (learnable from pixels)."""
    gen = torch.Generator().manual_seed(2000 + step)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
    labels = torch.randint(0, num_classes, (batch_size,), generator=gen)
    half = image_size // 2
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(label % 4, 2)
        images[i, :, row * half:(row + 1) * half, col * half:(col + 1) * half] += 1.0
    return (images,), labels


def build_vit() -> ModelSpec:
    """Transformers ViT, 2 layers, hidden 64, 16x16 images in 4x4 patches (Conv2d patch embedding), 4 classes."""
    config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, num_labels=4)
    config._attn_implementation = "eager"
    return ModelSpec(model=ViTLogits(config), make_batch=lambda b, s: image_batch(b, s, 16, 4),
                     loss_fn=F.cross_entropy, global_batch_size=8)
