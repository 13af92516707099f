"""The architecture zoo: transformers models as meshplan MODELs, built from their own config classes.

Every entry is tiny (2 layers, hidden 32, sequence 8, batch 8), has random weights (nothing is downloaded) and
runs transformers' own code with eager attention and `use_cache=False`. `build_<name>` (one per entry of `ZOO`,
made below) returns a `ModelSpec` whose model returns one tensor, the logits, on a deterministic synthetic
task: next-token prediction for language models, the quadrant of a bright square for image models.

`ZOO` maps a name to (family, what it exercises, the config). tests/test_zoo.py plans, trains and compares each
against one process; the README's Supported models table is generated from `ZOO` and those facts
(tests/test_zoo_readme.py checks it).
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from meshplan import ModelSpec

VOCAB = 64
SEQ_LEN = 8
HIDDEN = 32
BATCH = 8
IMAGE = 16


@dataclass(frozen=True)
class ZooEntry:
    """One architecture of the zoo."""

    family: str
    """"decoder", "encoder", "vision" (what its forward takes and its task)."""
    model_class: str
    """The transformers class (AutoModel head) built from the config."""
    config_class: str
    config: dict[str, Any]
    """Config keyword arguments (tiny sizes)."""
    exercises: str
    """What the architecture brings that the others do not (one line, for the README table)."""


_DEC = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=2 * HIDDEN, max_position_embeddings=2 * SEQ_LEN, use_cache=False)
_GQA = dict(_DEC, num_key_value_heads=2)
_ENC = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=2 * HIDDEN, max_position_embeddings=2 * SEQ_LEN, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)

ZOO: dict[str, ZooEntry] = {
    "llama": ZooEntry("decoder", "LlamaForCausalLM", "LlamaConfig", dict(_GQA, tie_word_embeddings=False),
                      "rotary, GQA (4 query / 2 key-value heads), SwiGLU, untied head"),
    "mistral": ZooEntry("decoder", "MistralForCausalLM", "MistralConfig",
                        dict(_GQA, sliding_window=4, tie_word_embeddings=False), "rotary, GQA, sliding window"),
    "qwen2": ZooEntry("decoder", "Qwen2ForCausalLM", "Qwen2Config", dict(_GQA, tie_word_embeddings=False),
                      "rotary, GQA, q/k/v biases"),
    "qwen3": ZooEntry("decoder", "Qwen3ForCausalLM", "Qwen3Config",
                      dict(_GQA, head_dim=8, tie_word_embeddings=False), "rotary, GQA, q/k RMSNorm per head"),
    "gemma": ZooEntry("decoder", "GemmaForCausalLM", "GemmaConfig", dict(_GQA, head_dim=8),
                      "rotary, GQA, GeGLU, scaled embedding, tied head"),
    "phi3": ZooEntry("decoder", "Phi3ForCausalLM", "Phi3Config", dict(_GQA, tie_word_embeddings=False,
                                                                      pad_token_id=0),
                     "rotary, fused qkv and gate_up projections"),
    "phi": ZooEntry("decoder", "PhiForCausalLM", "PhiConfig", dict(_DEC, partial_rotary_factor=0.5,
                                                                   resid_pdrop=0.0, embd_pdrop=0.0),
                    "partial rotary, parallel attention + MLP, biases"),
    "gpt_neox": ZooEntry("decoder", "GPTNeoXForCausalLM", "GPTNeoXConfig",
                         dict(_DEC, rotary_pct=0.5, use_parallel_residual=True, hidden_dropout=0.0,
                              attention_dropout=0.0, tie_word_embeddings=False),
                         "partial rotary, parallel residual, fused qkv"),
    "stablelm": ZooEntry("decoder", "StableLmForCausalLM", "StableLmConfig",
                         dict(_GQA, partial_rotary_factor=0.5, tie_word_embeddings=False),
                         "partial rotary, LayerNorm, GQA"),
    "olmo": ZooEntry("decoder", "OlmoForCausalLM", "OlmoConfig", dict(_GQA, tie_word_embeddings=False),
                     "rotary, non-parametric LayerNorm"),
    "starcoder2": ZooEntry("decoder", "Starcoder2ForCausalLM", "Starcoder2Config",
                           dict(_GQA, residual_dropout=0.0, embedding_dropout=0.0, tie_word_embeddings=False),
                           "rotary, GQA, GELU MLP with biases"),
    "granite": ZooEntry("decoder", "GraniteForCausalLM", "GraniteConfig", dict(_GQA, tie_word_embeddings=False),
                        "rotary, GQA, residual / logit multipliers"),
    "mixtral": ZooEntry("decoder", "MixtralForCausalLM", "MixtralConfig",
                        dict(_GQA, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
                        "mixture of 4 experts (top-2), dense experts, rotary, GQA"),
    "bloom": ZooEntry("decoder", "BloomForCausalLM", "BloomConfig",
                      dict(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=2, n_head=4, use_cache=False,
                           hidden_dropout=0.0, attention_dropout=0.0), "ALiBi, fused qkv, tied head"),
    "falcon": ZooEntry("decoder", "FalconForCausalLM", "FalconConfig",
                       dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                            alibi=True, parallel_attn=True, new_decoder_architecture=False, use_cache=False,
                            hidden_dropout=0.0, attention_dropout=0.0, bias=True),
                       "ALiBi, parallel attention + MLP, multi-query, tied head"),
    "gpt2": ZooEntry("decoder", "GPT2LMHeadModel", "GPT2Config",
                     dict(vocab_size=VOCAB, n_positions=2 * SEQ_LEN, n_embd=HIDDEN, n_layer=2, n_head=4,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False),
                     "learned positions, Conv1D linears, tied head"),
    "opt": ZooEntry("decoder", "OPTForCausalLM", "OPTConfig",
                    dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                         ffn_dim=2 * HIDDEN, max_position_embeddings=2 * SEQ_LEN, word_embed_proj_dim=HIDDEN,
                         dropout=0.0, attention_dropout=0.0, use_cache=False),
                    "learned offset positions, ReLU MLP, tied head"),
    "bert": ZooEntry("encoder", "BertForMaskedLM", "BertConfig", dict(_ENC), "post-norm encoder, tied MLM head"),
    "roberta": ZooEntry("encoder", "RobertaForMaskedLM", "RobertaConfig", dict(_ENC, pad_token_id=1),
                        "padding-offset positions, tied MLM head"),
    "electra": ZooEntry("encoder", "ElectraForMaskedLM", "ElectraConfig", dict(_ENC, embedding_size=16),
                        "embedding projection (16 -> 32), generator head"),
    "distilbert": ZooEntry("encoder", "DistilBertForMaskedLM", "DistilBertConfig",
                           dict(vocab_size=VOCAB, dim=HIDDEN, n_layers=2, n_heads=4, hidden_dim=2 * HIDDEN,
                                max_position_embeddings=2 * SEQ_LEN, dropout=0.0, attention_dropout=0.0),
                           "q/k/v/out linears, sinusoid-free learned positions"),
    "vit": ZooEntry("vision", "ViTForImageClassification", "ViTConfig",
                    dict(image_size=IMAGE, patch_size=4, num_channels=3, hidden_size=HIDDEN, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=2 * HIDDEN, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, num_labels=4), "Conv2d patches, class token"),
    "swin": ZooEntry("vision", "SwinForImageClassification", "SwinConfig",
                     dict(image_size=IMAGE, patch_size=2, num_channels=3, embed_dim=16, depths=[1, 1],
                          num_heads=[2, 4], window_size=4, mlp_ratio=2.0, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, drop_path_rate=0.0, num_labels=4),
                     "windowed attention, relative position bias, patch merging"),
    "convnext": ZooEntry("vision", "ConvNextForImageClassification", "ConvNextConfig",
                         dict(num_channels=3, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=4,
                              drop_path_rate=0.0), "depthwise 7x7 convolutions, channels-last LayerNorm"),
    "resnet": ZooEntry("vision", "ResNetForImageClassification", "ResNetConfig",
                       dict(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                            layer_type="basic", num_labels=4), "convolutions, BatchNorm"),
}


def _undecorate_rotary(model: nn.Module) -> None:
    """Run rotary embeddings' forward without transformers' `@torch.no_grad()` (same values; torch.export turns
    the decorator into a submodule the pipeline splitter calls without arguments, see examples/hf_llama.py)."""
    for module in model.modules():
        forward = type(module).forward
        if "Rotary" in type(module).__name__ and hasattr(forward, "__wrapped__"):
            module.forward = types.MethodType(forward.__wrapped__, module)


class ZooLogits(nn.Module):
    """A transformers model whose forward returns its logits; the attribute is the entry's name (so plans name
    layers `llama.model.layers.0`)."""

    def __init__(self, name: str, entry: ZooEntry):
        super().__init__()
        config = getattr(transformers, entry.config_class)(**entry.config)
        config._attn_implementation = "eager"
        if entry.model_class == "MixtralForCausalLM":
            config._experts_implementation = "batched_mm"  # dense experts as batched matmuls (float64 on CPU)
        self.name = name
        self.add_module(name, getattr(transformers, entry.model_class)(config))
        _undecorate_rotary(self)
        self.family = entry.family

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        net = getattr(self, self.name)
        if self.family == "vision":
            return net(pixel_values=inputs).logits
        if self.family == "decoder":
            return net(input_ids=inputs, use_cache=False).logits
        return net(input_ids=inputs).logits


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def token_batch(batch_size: int, step: int):
    """Token rows `start, start + stride, ...` mod VOCAB; targets are each token's successor."""
    gen = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, VOCAB, (batch_size, 1), generator=gen)
    stride = torch.randint(1, 4, (batch_size, 1), generator=gen)
    tokens = (start + stride * torch.arange(SEQ_LEN + 1)) % VOCAB
    return (tokens[:, :-1],), tokens[:, 1:]


def image_batch(batch_size: int, step: int):
    """Random images whose class is the quadrant holding a brighter square."""
    gen = torch.Generator().manual_seed(2000 + step)
    images = torch.randn(batch_size, 3, IMAGE, IMAGE, generator=gen)
    labels = torch.randint(0, 4, (batch_size,), generator=gen)
    half = IMAGE // 2
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(label, 2)
        images[i, :, row * half:(row + 1) * half, col * half:(col + 1) * half] += 1.0
    return (images,), labels


def build(name: str) -> ModelSpec:
    """The zoo entry `name` as a ModelSpec."""
    entry = ZOO[name]
    if entry.family == "vision":
        return ModelSpec(model=ZooLogits(name, entry), make_batch=image_batch, loss_fn=F.cross_entropy,
                         global_batch_size=BATCH)
    return ModelSpec(model=ZooLogits(name, entry), make_batch=token_batch, loss_fn=lm_loss, global_batch_size=BATCH)


def _builder(name: str):
    def build_entry() -> ModelSpec:
        return build(name)

    build_entry.__name__ = build_entry.__qualname__ = f"build_{name}"
    build_entry.__doc__ = f"Zoo entry {name}: {ZOO[name].model_class}, {ZOO[name].exercises}."
    return build_entry


for _name in ZOO:  # build_llama, build_mistral, ...: the MODEL functions (`tests/zoo_models.py:build_llama`)
    setattr(sys.modules[__name__], f"build_{_name}", _builder(_name))
