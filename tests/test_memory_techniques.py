"""Activation offload and checkpointing hooks on one process: what goes through `save_on_cpu`, and when.

On CPU offload moves nothing (the tensors already live on the host), so these tests count the tensors that
`save_on_cpu` packs: every tensor autograd saves in a plain offloaded layer, only the layer inputs under full
checkpointing, and nothing during the recomputation in backward.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_parity import GPT

from planner.api import plan
from planner.model_spec import load_model_spec
from runtime import memory_techniques
from runtime.memory_techniques import apply_activation_checkpointing, apply_activation_offload


@pytest.fixture(scope="module")
def base_plan():
    return plan(GPT, "cpu", 1, mesh=(1, 1, 1))


class CountingSaveOnCpu(torch.autograd.graph.save_on_cpu):
    """`save_on_cpu` that counts the tensors it packs, and whether any was packed in backward."""

    packed = 0
    packed_in_backward = 0

    def __init__(self, pin_memory: bool = False):
        super().__init__(pin_memory=pin_memory)
        pack, unpack = self.pack_hook, self.unpack_hook

        def counting_pack(tensor):
            CountingSaveOnCpu.packed += 1
            if torch._C._current_graph_task_id() != -1:
                CountingSaveOnCpu.packed_in_backward += 1
            return pack(tensor)

        self.pack_hook = counting_pack
        self.unpack_hook = unpack


def packed_tensors(base_plan, monkeypatch, checkpoint: str) -> tuple[int, int]:
    monkeypatch.setattr(memory_techniques.torch.autograd.graph, "save_on_cpu", CountingSaveOnCpu)
    CountingSaveOnCpu.packed = CountingSaveOnCpu.packed_in_backward = 0
    plan_obj = copy.deepcopy(base_plan)
    block = next(layer for layer in plan_obj.layers if layer.path == "blocks.0")
    block.checkpoint, block.offload_activations = checkpoint, True
    torch.manual_seed(0)
    spec = load_model_spec(plan_obj.model.source)
    apply_activation_checkpointing(spec.model, plan_obj)
    apply_activation_offload(spec.model, plan_obj, torch.device("cpu"))
    inputs, targets = spec.make_batch(2, 0)
    spec.loss_fn(spec.model(*inputs), targets).backward()
    assert all(p.grad is not None for p in spec.model.parameters())
    return CountingSaveOnCpu.packed, CountingSaveOnCpu.packed_in_backward


def test_offload_packs_what_the_layer_saves(base_plan, monkeypatch):
    plain, in_backward = packed_tensors(base_plan, monkeypatch, "none")
    assert plain > 10 and in_backward == 0


def test_offload_with_full_checkpoint_packs_only_inputs(base_plan, monkeypatch):
    plain, _ = packed_tensors(base_plan, monkeypatch, "none")
    full, in_backward = packed_tensors(base_plan, monkeypatch, "full")
    assert 1 <= full <= 2 < plain, (full, plain)
    assert in_backward == 0, "the recomputation in backward went through save_on_cpu"
