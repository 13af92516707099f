"""Meta-device build and per-block init replay (runtime/materialize.py), without process groups; the sharded
fill is checked end to end by the parity tests (tests/test_parity.py, zero3 over tp shards)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from runtime.materialize import BLOCK_ELEMENTS, build_reference, build_spec_on_meta

ROOT = Path(__file__).resolve().parents[1]
GPT = f"{ROOT}/examples/gpt.py:build_gpt"
MODELS = '''
import torch
import torch.nn.functional as F
from torch import nn
from meshplan import ModelSpec

class Model(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        if kind == "full":
            self.gain = nn.Parameter(torch.full((4,), 3.0))
        elif kind == "computed":
            self.gain = nn.Parameter(torch.randn(4) * 0.02)
        elif kind == "padding":
            self.table = nn.Embedding(8, 4, padding_idx=0)
        elif kind == "buffer":
            self.register_buffer("scale", torch.arange(4.0))
        elif kind == "index_table":  # Swin's relative_position_index: an in-place add on an arange's storage
            coords = torch.arange(4).view(2, 2).clone()
            coords[:, 0] += 1
            self.index = nn.Parameter(coords.float())
        elif kind == "tied":
            self.other = nn.Linear(4, 4)
            self.other.weight = self.lin.weight

def spec(kind):
    return ModelSpec(model=Model(kind), make_batch=lambda b, s: ((torch.zeros(b, 4),), torch.zeros(b, 4)),
                     loss_fn=F.mse_loss, global_batch_size=2)

def full(): return spec("full")
def computed(): return spec("computed")
def padding(): return spec("padding")
def buffer(): return spec("buffer")
def tied(): return spec("tied")
def index_table(): return spec("index_table")
'''


def test_gpt_is_built_on_meta_with_the_constructors_distributions():
    spec, init = build_spec_on_meta(GPT, seed=0)
    assert init is not None and all(p.is_meta for p in spec.model.parameters())
    assert [op.op.__name__ for op in init.recipes["wte.weight"]] == ["normal_.default", "normal_.default"]
    model = build_reference(GPT, seed=0).model
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    # output projections: GPT-2's 0.02 / sqrt(2 x layers); nn.Linear biases keep kaiming's uniform bound
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(0.02 / 8 ** 0.5, rel=0.05)
    assert model.blocks[0].attn.proj.bias.abs().max().item() <= 64 ** -0.5
    assert torch.equal(model.blocks[0].ln_1.weight, torch.ones(64))


def test_weights_depend_on_seed_and_name_only():
    first, again, other = (build_reference(GPT, seed=s).model for s in (0, 0, 1))
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters(), strict=True))
    assert not torch.equal(first.wte.weight, other.wte.weight)
    # blocks 0 and 1 have the same recipe but their own generators
    assert not torch.equal(first.blocks[0].attn.q.weight, first.blocks[1].attn.q.weight)


def test_blocks_are_independent_streams():
    _, init = build_spec_on_meta(f"{ROOT}/tests/models.py:build_wide_vocab_gpt", seed=0)
    rows_per_block = BLOCK_ELEMENTS // 64
    whole = init._generate("wte.weight", 0, (rows_per_block, 64), torch.float32)
    assert whole.shape[0] < 8192  # the 8192-row table spans several blocks, each generated alone
    assert torch.equal(whole, init._generate("wte.weight", 0, (rows_per_block, 64), torch.float32))
    assert not torch.equal(whole, init._generate("wte.weight", 1, (rows_per_block, 64), torch.float32))


@pytest.mark.parametrize("function, replayable", [("full", True), ("computed", False), ("padding", False),
                                                  ("buffer", False), ("tied", False),
                                                  ("index_table", False)])
def test_only_replayable_inits_are_materialised_per_shard(tmp_path, function, replayable):
    path = tmp_path / "models.py"
    path.write_text(MODELS)
    _, init = build_spec_on_meta(f"{path}:{function}", seed=0)
    assert (init is not None) == replayable
    model = build_reference(f"{path}:{function}", seed=0).model  # built whole from the seed otherwise
    assert not any(p.is_meta for p in model.parameters())
    if function == "full":
        assert torch.equal(model.gain, torch.full((4,), 3.0))
