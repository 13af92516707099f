"""Model builders the benchmarks plan (meta device only: the planner never allocates their weights).

    gpt3_175b   GPT-3 175B: 96 layers, hidden 12288, 96 heads, seq 2048, vocab 51200, global batch 1536
    gpt_1_3b    GPT-3 XL 1.3B: 24 layers, hidden 2048, 16 heads, seq 2048, vocab 51200, global batch 512
    llama_70b   Llama-2-style 70B: 80 layers, hidden 8192, 64 heads (8 KV heads), SwiGLU 28672, seq 4096
    gpt_6_7b, gpt_13b   GPT-3 6.7B and 13B (32 x 4096 and 40 x 5120), seq 2048, global batch 512
    llama_7b    Llama-2-style 7B: 32 layers, hidden 4096, SwiGLU 11008, seq 4096, global batch 512
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from gpt import build_gpt  # noqa: E402
from llama import build_llama  # noqa: E402


def gpt3_175b():
    return build_gpt(vocab=51200, seq_len=2048, hidden=12288, num_heads=96, num_layers=96, global_batch_size=1536)


def gpt_1_3b():
    return build_gpt(vocab=51200, seq_len=2048, hidden=2048, num_heads=16, num_layers=24, global_batch_size=512)


def llama_70b():
    return build_llama(vocab=32000, seq_len=4096, hidden=8192, num_heads=64, num_kv_heads=8,
                       intermediate=28672, num_layers=80, global_batch_size=1024)


def gpt_6_7b():
    return build_gpt(vocab=51200, seq_len=2048, hidden=4096, num_heads=32, num_layers=32, global_batch_size=512)


def gpt_13b():
    return build_gpt(vocab=51200, seq_len=2048, hidden=5120, num_heads=40, num_layers=40, global_batch_size=512)


def llama_7b():
    return build_llama(vocab=32000, seq_len=4096, hidden=4096, num_heads=32, num_kv_heads=32,
                       intermediate=11008, num_layers=32, global_batch_size=512)
