"""Models nobody here wrote: Hugging Face transformers GPT-2, Llama, BERT, ViT and ResNet (tiny configs, random
weights, nothing downloaded) plan for 4 ranks on the `cpu` cluster and train on 4 gloo processes like one process.

One torchrun launch per model (tests/parity_worker.py; pipeline plans go to pipeline_parity_worker.compare_plan)
runs the planner's own plan and meshes pinned so that tensor parallelism (GPT-2's transformers Conv1D, Llama,
BERT, ViT) and a pipeline (Llama, 2 stages x dp2) run, 3 AdamW steps each in float64, comparing the global-batch
loss and every gradient at each step and every parameter and floating buffer (BatchNorm running statistics,
rotary tables) at the end, as relative errors of the difference's norm per tensor (parity_worker.rel_diff): loss,
gradients and buffers within 1e-9 (summation order is the only difference; a missing reduction shows up as O(1)),
parameters within 1e-8: BERT's and ViT's attention key biases have zero gradients in exact arithmetic (softmax
cancels them), so their gradients are ~1e-17 rounding noise that Adam (eps 1e-8) turns into ~1e-12 updates, which
differ between summation orders by ~1e-15, 1e-9 of parity_worker's 1e-6 norm floor.

ResNet's BatchNorm (train mode, plain BatchNorm2d): each dp rank normalises with its own slice's statistics, so
the reference runs each dp slice separately and averages gradients, and its running statistics follow this rank's
slice (tests/parity_worker.batchnorm_reference_forward_backward; SyncBatchNorm refuses CPU tensors).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from test_parity import force_tensor_parallel, run_parity
from test_pipeline_parity import pipeline_plan

from planner.api import plan

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


PINNED = {
    "gpt2": {"dp2xtp2": lambda m: pinned_tensor_parallel(m)},
    "llama": {"dp2xtp2": lambda m: pinned_tensor_parallel(m),
              "pp2xdp2": lambda m: pipeline_plan(m, 2, 2, 1, "1f1b", 2, ("llama.model.layers.1",))},
    "bert": {"dp2xtp2": lambda m: pinned_tensor_parallel(m)},
    "vit": {"dp2xtp2": lambda m: pinned_tensor_parallel(m)},
    "resnet": {},
}


@functools.cache
def planned(name: str):
    return plan(MODELS[name], "cpu", 4)


@pytest.mark.parametrize("name", list(MODELS))
def test_hf_model_trains_like_one_process(name, tmp_path):
    plans = {"planned": planned(name), **{key: make(MODELS[name]) for key, make in PINNED[name].items()}}
    results = run_parity(plans, tmp_path, "float64", steps=STEPS)
    for key, result in results.items():
        for quantity, worst in result["worst"].items():
            assert worst < TOLERANCE[quantity], (key, quantity, result)
