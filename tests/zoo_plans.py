"""The plans the zoo runs for each architecture (tests/zoo_models.py), and the refusals it expects.

For every model: the planner's own plan for 4 ranks of the `cpu` cluster (no pin), the planner's plan on the
pinned mesh pp2 x dp2 (its own pipeline cut and schedule), and on the pinned mesh dp2 x tp2 with every layer
that has tensor-parallel units running them (as a person would edit it). The model is captured once and the
three searches share the graph.
"""

from __future__ import annotations

import copy
from pathlib import Path

from costmodel import load_cluster
from planner.api import plan_from_search
from planner.model_graph import build_model_graph
from planner.model_spec import load_model_spec
from planner.plan import Plan, TensorParallelUnitPlan
from planner.plan_schema import PlanError
from planner.search import search_plans

ROOT = Path(__file__).resolve().parents[1]
SOURCE = f"{ROOT}/tests/zoo_models.py"
WORLD_SIZE = 4
MESHES = {"planned": None, "pp2xdp2": (2, 2, 1), "dp2xtp2": (1, 2, 2)}
"""Plan name -> the pinned (pp, dp, tp), None for the planner's own choice."""

TIED = "tied"
REFUSED = {(name, "pp2xdp2"): TIED for name in
           ("gemma", "bloom", "falcon", "gpt2", "opt", "bert", "roberta", "electra", "distilbert")}
"""(model, plan) -> why `plan` refuses it: the head is tied to the token embedding, so no stage boundary can
fall between them (the error names the tied weights)."""

INPLACE = "inplace"
KNOWN_FAILURES = {("falcon", "dp2xtp2"): INPLACE}
"""(model, plan) -> why it fails at execute today (not yet refused at plan time; the zoo does not run it):
Falcon's parallel block adds in place onto the row-parallel MLP output (`mlp_output += attention_output`), a
view that DTensor's `to_local` returns, which autograd refuses to modify in place."""


NOT_YET_RUN = frozenset({"qwen3", "falcon", "bloom", "gpt2", "opt", "bert", "roberta", "electra", "distilbert",
                         "vit", "resnet"})
"""Models whose zoo plans have not yet been run to completion (`MESHPLAN_ZOO=NAME pytest tests/test_zoo.py`):
the README table says so instead of claiming parity. GPT-2, BERT, ViT and ResNet train in tests/test_hf_models.py
in similar configurations on every run. Remove a name once its three plans have passed."""


def model_source(name: str) -> str:
    return f"{SOURCE}:build_{name}"


def zoo_plans(name: str, keys=tuple(MESHES)) -> dict[str, Plan | PlanError]:
    """The model's plans by name (those of MESHES in `keys`), or the PlanError `plan` raised for it."""
    source = model_source(name)
    spec = load_model_spec(source, device="meta")
    graph = build_model_graph(spec)
    cluster = load_cluster("cpu").for_world_size(WORLD_SIZE)
    units = {layer.path: layer.tp_units for layer in graph.layers}
    plans: dict[str, Plan | PlanError] = {}
    for key, mesh in MESHES.items():
        if key not in keys:
            continue
        try:
            found = search_plans(spec.model, graph, cluster, WORLD_SIZE, spec.global_batch_size, "float32", mesh)
        except PlanError as err:
            plans[key] = err
            continue
        result = plan_from_search(source, graph, cluster, WORLD_SIZE, spec.global_batch_size, found, 0)
        if key == "dp2xtp2":
            result = copy.deepcopy(result)
            for layer in result.layers:
                if units[layer.path]:
                    layer.strategy = "tensor"
                    layer.tensor_parallel = [TensorParallelUnitPlan(list(u.colwise), u.rowwise)
                                             for u in units[layer.path]]
        result.validate(f"{name} {key}")
        plans[key] = result
    return plans
