"""The architecture zoo (tests/zoo_models.py): each model planned by the planner and trained on 4 gloo ranks like
one process.

For every model, three plans (tests/zoo_plans.py): the planner's own for 4 ranks of the `cpu` cluster, its plan on
the pinned mesh pp2 x dp2 (its own cut and schedule), and on the pinned mesh dp2 x tp2 with every layer that has
tensor-parallel units running them; or, where the model cannot run a shape, the PlanError `plan` raises, which
must name the reason listed in zoo_plans.REFUSED. All plans of a run share one torchrun launch
(tests/parity_worker.py; pipeline plans go to pipeline_parity_worker.compare_plan): 2 AdamW steps in float64,
comparing the global-batch loss and every gradient at each step and every parameter and floating buffer at the
end against one process (parity_worker.rel_diff): loss, gradients and buffers within 1e-9, parameters within 1e-8
(as tests/test_hf_models.py). Gemma's RMSNorm computes in float32 whatever the input dtype, so its gradients
carry float32 rounding (4e-8 measured): its bounds are float32's (GEMMA_TOLERANCE).

Selection, to stay inside CI's time: planning and training one model's three plans costs ~30 s on 2 cores, so a
default run covers CORE (Qwen2: GQA + rotary; Mixtral: MoE as dense experts; Swin: windowed attention with a
relative position bias; ConvNeXt: a CNN with channels-last stage outputs), the models whose failures the zoo
was built to fix; tests/test_hf_models.py trains GPT-2, Llama, BERT, ViT and ResNet on every run too.
`MESHPLAN_ZOO=all` runs every model (what the README table reports, run before each change to the zoo or the
runtime paths it covers); `MESHPLAN_ZOO=llama,swin` runs those. The plans in ALWAYS (root-cause regressions
without a cheaper test) run every time, in the same launch. The default is fixed rather than rotating, so a
run's outcome does not depend on the day it runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_parity import run_parity
from zoo_models import ZOO
from zoo_plans import KNOWN_FAILURES, REFUSED, TIED, zoo_plans

from planner.plan_schema import PlanError

TOLERANCE = {"loss": 1e-9, "grad": 1e-9, "buffer": 1e-9, "param": 1e-8}
GEMMA_TOLERANCE = {"loss": 1e-9, "grad": 1e-6, "buffer": 1e-9, "param": 1e-6}
STEPS = 2
CORE = ("convnext", "mixtral", "qwen2", "swin")
ALWAYS = [("swin", "dp2xtp2")]
"""Swin's relative position bias is a replicated parameter meeting head-sharded scores: under zero3 + tensor
parallelism its DTensor gradient once broke FSDP2's reduce-scatter (runtime/parallelize.py,
gather_replicated_gradients)."""
REFUSAL_TEXT = {TIED: "layers that share a parameter must sit on one pipeline stage"}


def selected_models() -> list[str]:
    """The models this run covers (module docstring: selection)."""
    chosen = os.environ.get("MESHPLAN_ZOO", "")
    if chosen == "all":
        return sorted(ZOO)
    if chosen:
        return [name.strip() for name in chosen.split(",")]
    return list(CORE)


MODELS = selected_models()


@pytest.fixture(scope="module")
def zoo_results(tmp_path_factory) -> dict:
    """(plans by `model-plan`, parity results by `model-plan`) for this run's models, in one launch."""
    plans = {f"{name}-{key}": result for name in MODELS for key, result in zoo_plans(name).items()}
    for name, key in ALWAYS:
        if name not in MODELS:
            plans.update({f"{name}-{k}": result for k, result in zoo_plans(name, (key,)).items()})
    runnable = {key: result for key, result in plans.items()
                if not isinstance(result, PlanError) and tuple(key.split("-", 1)) not in KNOWN_FAILURES}
    return plans, run_parity(runnable, tmp_path_factory.mktemp("zoo"), "float64", steps=STEPS)


@pytest.mark.parametrize("name", MODELS)
def test_zoo_model_plans_and_trains_like_one_process(name, zoo_results):
    plans, parity = zoo_results
    bounds = GEMMA_TOLERANCE if name == "gemma" else TOLERANCE
    for key in ("planned", "pp2xdp2", "dp2xtp2"):
        result = plans[f"{name}-{key}"]
        if (name, key) in REFUSED:
            assert isinstance(result, PlanError), (name, key, "was expected to be refused")
            assert REFUSAL_TEXT[REFUSED[name, key]] in str(result), str(result)
            continue
        assert not isinstance(result, PlanError), (name, key, str(result))
        if (name, key) in KNOWN_FAILURES:  # zoo_plans.KNOWN_FAILURES: listed in the README's table, not run
            continue
        if key == "pp2xdp2":
            assert result.mesh.pp == 2 and result.mesh.dp == 2
        for quantity, worst in parity[f"{name}-{key}"]["worst"].items():
            assert worst < bounds[quantity], (name, key, quantity, parity[f"{name}-{key}"])


@pytest.mark.parametrize(("name", "key"), ALWAYS)
def test_zoo_regressions_train_like_one_process(name, key, zoo_results):
    plans, parity = zoo_results
    assert any(layer.strategy == "tensor" for layer in plans[f"{name}-{key}"].layers)
    for quantity, worst in parity[f"{name}-{key}"]["worst"].items():
        assert worst < TOLERANCE[quantity], (name, key, quantity, parity[f"{name}-{key}"])


def test_readme_supported_models_table_is_the_zoo():
    """The README's Supported models table is exactly what tests/zoo_table.py generates from the zoo."""
    from zoo_table import supported_models_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert supported_models_table() in readme, "README's zoo table is stale: run python tests/zoo_table.py"
    assert len(ZOO) >= 20


def test_a_tiny_model_on_cpu_ranks_is_not_offloaded():
    """On CPU ranks the host is the same memory, and the host runs the same per-tensor AdamW loop as the device:
    an offloaded optimizer step pays the profile's per-tensor overhead too, so a model using 0.1% of memory is
    not planned as zero3 + host offload (it was, for most of the zoo, when offload skipped that overhead)."""
    from zoo_plans import model_source

    from planner.api import plan

    chosen = plan(model_source("llama"), "cpu", 4)
    assert not chosen.data_parallel.offload, chosen.data_parallel
