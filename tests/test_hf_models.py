"""Models nobody here wrote: Hugging Face transformers GPT-2, Llama, BERT, ViT and ResNet (tiny configs, random
weights, nothing downloaded) plan for 4 ranks on the `cpu` cluster and train on 4 gloo processes like one process.

One torchrun launch for all models (tests/parity_worker.py; pipeline plans go to
pipeline_parity_worker.compare_plan) runs each model's planner-chosen plan and meshes pinned so that tensor
parallelism (GPT-2's transformers Conv1D, Llama, BERT, ViT; GPT-2 and Llama also 2-D, tensor2d on a 2 x 2
grid) and pipelines (Llama, ViT, ResNet: 2 stages x dp2,
2 micro-batches, 1F1B) run, 3 AdamW
steps each in float64, comparing the global-batch
loss and every gradient at each step and every parameter and floating buffer (BatchNorm running statistics,
rotary tables) at the end, as relative errors of the difference's norm per tensor (parity_worker.rel_diff): loss,
gradients and buffers within 1e-9 (summation order is the only difference; a missing reduction shows up as O(1)),
parameters within 1e-8: BERT's and ViT's attention key biases have zero gradients in exact arithmetic (softmax
cancels them), so their gradients are ~1e-17 rounding noise that Adam (eps 1e-8) turns into ~1e-12 updates, which
differ between summation orders by ~1e-15, 1e-9 of parity_worker's 1e-6 norm floor.

ResNet's BatchNorm (train mode, plain BatchNorm2d): each dp rank normalises each micro-batch of its slice with that
micro-batch's statistics, so the reference does the same per micro-batch and averages gradients, and its running
statistics follow this rank's micro-batches (parity_worker.batchnorm_reference_forward_backward; SyncBatchNorm
refuses CPU tensors).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_parity import force_tensor_2d, force_tensor_parallel, run_parity
from test_pipeline_parity import pipeline_plan
from torch import nn

from meshplan import ModelSpec
from planner.api import plan
from planner.capture import CaptureError, capture_training_step
from planner.evaluate_config import allowed_stage_starts
from planner.model_graph import build_model_graph
from planner.model_spec import load_model_spec
from planner.plan import DataParallelPlan
from planner.plan_schema import PlanError
from planner.tensor_parallel_units import TensorParallelUnit

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"gpt2": f"{ROOT}/tests/hf_models.py:build_gpt2", "llama": f"{ROOT}/examples/hf_llama.py:build_hf_llama",
          "bert": f"{ROOT}/tests/hf_models.py:build_bert", "vit": f"{ROOT}/tests/hf_models.py:build_vit",
          "resnet": f"{ROOT}/examples/resnet.py:build_resnet"}
TOLERANCE = {"loss": 1e-9, "grad": 1e-9, "buffer": 1e-9, "param": 1e-8}
STEPS = 3


def pinned_tensor_parallel(model: str):
    """The planner's plan on a pinned 1 x 2 x 2 mesh, every layer with units tensor-parallel."""
    result = force_tensor_parallel(plan(model, "cpu", 4, mesh=(1, 2, 2)))
    assert any(layer.strategy == "tensor" for layer in result.layers)
    return result


def with_ddp(result):
    result.data_parallel = DataParallelPlan(kind="ddp")
    result.validate("test")
    return result


def pinned_tensor_2d(model: str):
    """The planner's plan on a pinned 1 x 1 x 4 mesh, every layer with units on a 2 x 2 grid (tensor2d)."""
    return force_tensor_2d(plan(model, "cpu", 4, mesh=(1, 1, 4)), 2)


PINNED = {
    "gpt2": {"dp2xtp2": lambda m: pinned_tensor_parallel(m),
             "dp2xtp2_ddp": lambda m: with_ddp(pinned_tensor_parallel(m)),
             "tp2x2": pinned_tensor_2d},
    "llama": {"dp2xtp2": lambda m: pinned_tensor_parallel(m), "tp2x2": pinned_tensor_2d,
              "pp2xdp2": lambda m: pipeline_plan(m, 2, 2, 1, "1f1b", 2, ("llama.model.layers.1",))},
    "bert": {"dp2xtp2": lambda m: pinned_tensor_parallel(m)},
    "vit": {"dp2xtp2": lambda m: pinned_tensor_parallel(m),
            "pp2xdp2": lambda m: pipeline_plan(m, 2, 2, 1, "1f1b", 2, ("vit.vit.layers.1",))},
    "resnet": {"pp2xdp2": lambda m: pipeline_plan(m, 2, 2, 1, "1f1b", 2, ("resnet.resnet.encoder.stages.1",))},
}


@functools.cache
def planned(name: str):
    return plan(MODELS[name], "cpu", 4)


# parameters sharded over tp on the pinned dp2xtp2 meshes, by dim: GPT-2's Conv1D weights are [in, out], so
# column-parallel c_attn / c_fc shard dim 1 (bias dim 0) and row-parallel c_proj shards dim 0 (bias replicated)
EXPECTED_TP_SHARDS = {
    "gpt2": {f"gpt.transformer.h.{i}.{name}": dim for i in range(2) for name, dim in [
        ("attn.c_attn.weight", 1), ("attn.c_attn.bias", 0), ("attn.c_proj.weight", 0),
        ("mlp.c_fc.weight", 1), ("mlp.c_fc.bias", 0), ("mlp.c_proj.weight", 0)]},
    "llama": {f"llama.model.layers.{i}.{name}.weight": dim for i in range(2) for name, dim in [
        ("self_attn.q_proj", 0), ("self_attn.k_proj", 0), ("self_attn.v_proj", 0), ("self_attn.o_proj", 1),
        ("mlp.gate_proj", 0), ("mlp.up_proj", 0), ("mlp.down_proj", 1)]},
}


@pytest.fixture(scope="module")
def parity_results(tmp_path_factory) -> dict:
    """Every model's plans in one torchrun launch (starting 4 processes that import torch and transformers costs
    more than training these models); results keyed `model-plan`."""
    plans = {}
    for name, source in MODELS.items():
        plans[f"{name}-planned"] = planned(name)
        plans.update({f"{name}-{key}": make(source) for key, make in PINNED[name].items()})
    return run_parity(plans, tmp_path_factory.mktemp("hf_parity"), "float64", steps=STEPS)


@pytest.mark.parametrize("name", list(MODELS))
def test_hf_model_trains_like_one_process(name, parity_results):
    results = {key.removeprefix(f"{name}-"): r for key, r in parity_results.items() if key.startswith(f"{name}-")}
    assert set(results) == {"planned", *PINNED[name]}
    for key, result in results.items():
        for quantity, worst in result["worst"].items():
            assert worst < TOLERANCE[quantity], (key, quantity, result)
    if name in EXPECTED_TP_SHARDS:
        for key in results:
            if key.startswith("dp2xtp2"):
                assert results[key]["tp_shards"] == EXPECTED_TP_SHARDS[name], key
    if "tp2x2" in results:  # tensor2d: every unit weight input features over rows, output over columns; so are
        # the biases (Shard(0) over the columns): Conv1D's [in, out] weights shard dims [0, 1], nn.Linear's [1, 0]
        shards = results["tp2x2"]["tp_shards"]
        expected = [0, 1] if name == "gpt2" else [1, 0]
        assert {tuple(dims) for key, dims in shards.items() if key.endswith(".weight")} == {tuple(expected)}
        assert len(shards) == len(EXPECTED_TP_SHARDS[name]) + (4 if name == "gpt2" else 0), shards


@pytest.mark.parametrize("script", ["hf_llama.py", "resnet.py"])
def test_example_script_plans_and_trains(script):
    """The examples run as documented (`python examples/X.py --world-size N --steps N`): plan, train, report."""
    completed = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--world-size", "2", "--steps", "2"],
                               env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                               timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert re.search(r"trained 2 steps: loss \d+\.\d+ -> \d+\.\d+", completed.stdout), completed.stdout
    assert "ran 2 steps on 2 ranks" in completed.stdout, completed.stdout


def graph_of(name: str):
    return build_model_graph(load_model_spec(MODELS[name], device="meta"))


def test_gpt2_conv1d_is_tensor_parallel_and_its_tied_head_counts_once():
    graph = graph_of("gpt2")
    layers = {layer.path: layer for layer in graph.layers}
    for i in range(2):
        assert layers[f"gpt.transformer.h.{i}"].tp_units == [
            TensorParallelUnit(("attn.c_attn",), "attn.c_proj"), TensorParallelUnit(("mlp.c_fc",), "mlp.c_proj")]
    model = load_model_spec(MODELS["gpt2"], device="meta").model
    assert graph.num_params == sum(p.numel() for p in model.parameters())  # wte = lm_head counted once
    assert sum(layer.num_params for layer in graph.layers) == graph.num_params
    assert layers["gpt.lm_head"].num_params == 0  # its weight is wte's, counted where it is first used


def test_validate_recosts_a_gpt2_plan_with_conv1d_tensor_parallel_units():
    """`meshplan validate`'s check accepts Conv1D units (not only nn.Linear) and re-costs the edit exactly."""
    from meshplan.validate import recost_file

    pinned = pinned_tensor_parallel(MODELS["gpt2"])
    tensor_layers = [layer.path for layer in pinned.layers if layer.strategy == "tensor"]
    assert tensor_layers == ["gpt.transformer.h.0", "gpt.transformer.h.1"]
    recosted = recost_file(pinned, MODELS["gpt2"], "cpu")
    assert recosted.prediction.peak_memory_mib > 0 and recosted.prediction.step_time_ms > 0


def test_bert_head_with_layernorm_and_tied_decoder_is_not_tensor_parallel():
    """bert.cls is dense -> LayerNorm -> decoder (tied to the word embedding): sharding dense's outputs would
    normalise a shard, and sharding the decoder would shard the embedding, so it has no unit; the encoder
    layers keep theirs."""
    layers = {layer.path: layer for layer in graph_of("bert").layers}
    assert layers["bert.cls"].tp_units == []
    assert len(layers["bert.bert.encoder.layer.0"].tp_units) == 2


def test_tied_weights_keep_pipeline_stages_together():
    """GPT-2's head is tied to its first layer: no stage boundary can fall between them, so the search plans pp = 1
    and a pinned pipeline is refused with the tied names; an untied model (examples/hf_llama.py) cuts freely."""
    assert planned("gpt2").mesh.pp == 1
    with pytest.raises(PlanError, match=r"gpt\.transformer\.wte\.weight = gpt\.lm_head\.weight"):
        plan(MODELS["gpt2"], "cpu", 4, mesh=(2, 2, 1))
    graph = graph_of("gpt2")
    spec = load_model_spec(MODELS["gpt2"], device="meta")
    assert allowed_stage_starts(spec.model, graph.layers) == [0]
    llama = load_model_spec(MODELS["llama"], device="meta")
    assert allowed_stage_starts(llama.model, graph_of("llama").layers) == list(range(6))


class DataDependentGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if h.sum() > 0:  # reads a value: cannot be traced on fake tensors
            return h
        return -h


def test_capture_error_names_the_op_the_line_the_module_and_the_fix():
    model = nn.Sequential(nn.Linear(8, 8), DataDependentGate())
    spec = ModelSpec(model=model, make_batch=lambda b, s: ((torch.randn(b, 8),), torch.randn(b, 8)),
                     loss_fn=F.mse_loss, global_batch_size=4)
    with pytest.raises(CaptureError) as caught:
        capture_training_step(spec, 4)
    message = str(caught.value)
    assert "op: aten._local_scalar_dense" in message
    assert re.search(r"test_hf_models\.py:\d+: if h\.sum\(\) > 0:", message), message
    assert "in module: 1 (DataDependentGate)" in message
    assert "torch.where" in message and "use_cache=False" in message
