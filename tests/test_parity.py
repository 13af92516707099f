"""Numerics parity on CPU/gloo: a plan run on 2, 4 or 8 ranks matches a single-process run of the same model.

Starting torchrun costs more than training a tiny model, so the plans of the tests below run in four launches
(`launches`: 4 ranks float64, 4 ranks float32, 2 ranks float64, 8 ranks float64), each test reading its plans'
results. The GPT meshes run twice, 5 AdamW steps each, comparing at every step the global-batch loss and every gradient,
and every parameter at the end (relative error of the difference's norm, per tensor):
- float64: loss, gradients and parameters within 1e-9. Summation order is the only difference, so anything
  larger is a bug (a missing all-reduce shows up as O(1)).
- float32: loss within 1e-5. Gradients and parameters within 1e-3 only: LayerNorm biases have gradients
  that are sums of nearly cancelling terms, where a different reduction order changes the result at ~1e-5
  relative, and Adam passes that on to the parameters.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from planner.api import plan
from planner.plan import DataParallelPlan, TensorParallelUnitPlan

ROOT = Path(__file__).resolve().parents[1]
GPT = f"{ROOT}/examples/gpt.py:build_gpt"
WIDE_VOCAB_GPT = f"{ROOT}/tests/models.py:build_wide_vocab_gpt"
TOLERANCE = {"float64": {"loss": 1e-9, "grad": 1e-9, "param": 1e-9},
             "float32": {"loss": 1e-5, "grad": 1e-3, "param": 1e-3}}
STEPS = 5


def run_parity(plans: dict, tmp_path: Path, dtype: str, steps: int = STEPS) -> dict:
    """Run every plan of `plans` (name -> Plan, one world size) in one torchrun launch; results by name."""
    files = {}
    for name, plan_obj in plans.items():
        files[name] = tmp_path / f"{name}.yaml"
        plan_obj.save(files[name])
    out = tmp_path / "parity.json"
    world_size = next(iter(plans.values())).world_size
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}",
               str(ROOT / "tests" / "parity_worker.py"), str(out), str(steps), dtype, *map(str, files.values())]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-6000:]
    results = json.loads(out.read_text())
    return {name: results[str(path)] for name, path in files.items()}


def force_tensor_parallel(plan_obj):
    """Edit the plan as a person would: every layer that has units runs them tensor-parallel."""
    from planner.model_graph import build_model_graph
    from planner.model_spec import load_model_spec

    graph = build_model_graph(load_model_spec(plan_obj.model.source, device="meta"))
    units = {layer.path: layer.tp_units for layer in graph.layers}
    for layer in plan_obj.layers:
        if units[layer.path]:
            layer.strategy = "tensor"
            layer.tensor_parallel = [TensorParallelUnitPlan(list(u.colwise), u.rowwise) for u in units[layer.path]]
    return plan_obj


LAUNCH_STEPS = {(4, "float64"): STEPS, (4, "float32"): STEPS, (2, "float64"): 3, (8, "float64"): 2}
"""Steps of each launch (world size, dtype)."""


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """results(world_size, dtype) -> {plan name: parity result}: every plan of PLAN_BUILDERS for that launch,
    built and run in one torchrun launch on first use, cached for the module."""
    done: dict[tuple[int, str], dict] = {}

    def results(world_size: int, dtype: str) -> dict:
        key = (world_size, dtype)
        if key not in done:
            plans = {}
            for builder in PLAN_BUILDERS:
                plans.update(builder(world_size, dtype))
            tmp = tmp_path_factory.mktemp(f"parity_w{world_size}_{dtype}")
            done[key] = run_parity(plans, tmp, dtype, LAUNCH_STEPS[key])
        return done[key]

    return results


GPT_MESHES = {"dp4": (1, 4, 1), "dp2xtp2": (1, 2, 2), "tp4": (1, 1, 4)}


def gpt_plans(world_size: int, dtype: str) -> dict:
    """The planner's plan on each pinned 4-rank mesh, every layer with units tensor-parallel where tp > 1."""
    if world_size != 4:
        return {}
    plans = {}
    for name, mesh in GPT_MESHES.items():
        plan_obj = plan(GPT, "cpu", 4, mesh=mesh)
        if mesh[2] > 1:
            plan_obj = force_tensor_parallel(plan_obj)
            assert sum(layer.strategy == "tensor" for layer in plan_obj.layers) == 4
        plans[f"gpt_{name}"] = plan_obj
    return plans


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("mesh", list(GPT_MESHES))
def test_gpt_matches_single_process(mesh, dtype, launches):
    result = launches(4, dtype)[f"gpt_{mesh}"]
    assert not result["not_compared"]
    for quantity, tolerance in TOLERANCE[dtype].items():
        assert result["worst"][quantity] < tolerance, (quantity, result)


def force_vocab_parallel(plan_obj):
    """Edit the plan: the token embedding and the head sharded on the vocabulary, the blocks tensor-parallel."""
    plan_obj = force_tensor_parallel(plan_obj)
    for layer in plan_obj.layers:
        if layer.path in ("wte", "head"):
            layer.strategy, layer.checkpoint, layer.offload_activations = "vocab", "none", False
    plan_obj.validate("forced")
    return plan_obj


VOCAB_MESHES = {2: (1, 1, 2), 4: (1, 2, 2)}


def vocab_plans(world_size: int, dtype: str) -> dict:
    """Vocabulary-parallel plans: ddp on tp2; ddp, zero3 and zero3 of a wide-vocabulary GPT on dp2 x tp2."""
    if dtype != "float64" or world_size not in VOCAB_MESHES:
        return {}
    mesh = VOCAB_MESHES[world_size]
    base = plan(GPT, "cpu", world_size, mesh=mesh)
    plans = {}
    for kind in ("ddp", "zero3") if mesh[1] > 1 else ("ddp",):
        plan_obj = force_vocab_parallel(copy.deepcopy(base))
        plan_obj.data_parallel = DataParallelPlan(kind=kind)
        plans[f"vocab_{kind}"] = plan_obj
    if mesh[1] > 1:
        wide = copy.deepcopy(plans["vocab_zero3"])
        wide.model.source = WIDE_VOCAB_GPT
        plans["vocab_wide_zero3"] = wide
    return plans


@pytest.mark.parametrize("world_size", list(VOCAB_MESHES), ids=["tp2", "dp2xtp2"])
def test_vocab_parallel_matches_single_process(world_size, launches):
    """Vocabulary-parallel embedding and head + loss_parallel, float64 (1e-9): with ddp and zero3 over dp.

    The model is built on the meta device and each rank materialises only its shards (runtime/materialize.py):
    on dp2 x tp2 zero3 a GPT with a vocabulary of 8192 (wte and head 8192 x 64 each) never has a tensor of
    more than a quarter of that on any rank while it is built."""
    everything = launches(world_size, "float64")
    results = {name: r for name, r in everything.items() if name.startswith("vocab_")}
    assert len(results) == (3 if world_size == 4 else 1), sorted(results)
    for name, result in results.items():
        assert result["materialized_shards_only"], name
        assert {"wte.weight", "head.weight", "blocks.0.attn.q.weight"} <= set(result["tp_shards"]), result
        assert "wpe.weight" not in result["tp_shards"] and not result["not_compared"]
        for quantity, tolerance in TOLERANCE["float64"].items():
            assert result["worst"][quantity] < tolerance, (name, quantity, result)
    if world_size == 4:
        full_embedding = 8192 * 64
        assert results["vocab_wide_zero3"]["largest_tensor_built_numel"] <= full_embedding // 4
        assert results["vocab_wide_zero3"]["local_parameter_numel"] < 0.3 * (2 * full_embedding)


def force_tensor_2d(plan_obj, tp_rows: int, paths=None):
    """Edit the plan: the `tensor` layers in `paths` (default: all; with none yet, every layer with units is made
    one first) run their units on a tp_rows x tp / tp_rows grid (strategy tensor2d)."""
    if not any(layer.strategy in ("tensor", "tensor2d") for layer in plan_obj.layers):
        plan_obj = force_tensor_parallel(plan_obj)
    for layer in plan_obj.layers:
        if layer.strategy == "tensor" and (paths is None or layer.path in paths):
            layer.strategy, layer.tp_rows = "tensor2d", tp_rows
    plan_obj.validate("forced")
    return plan_obj


def assert_parity(results: dict) -> None:
    for name, result in results.items():
        assert not result["not_compared"], (name, result)
        for quantity, tolerance in TOLERANCE["float64"].items():
            assert result["worst"][quantity] < tolerance, (name, quantity, result)


def tensor_2d_plans(world_size: int, dtype: str) -> dict:
    """tp=4 as a 2 x 2 grid (strategy tensor2d, runtime/tensor_parallel_2d.py):
    - tp2x2: every block 2-D;
    - mixed: blocks 0 and 2 1-D `tensor` with sequence parallelism beside 1 and 3 `tensor2d`, the embedding and
      head vocabulary-parallel;
    - techniques: 2-D blocks with selective and full checkpointing and activation offload, 2 micro-batches
      (gradient accumulation; 4 samples each, split over 2 rows), zero3 with CPUOffloadPolicy.
    dp2 x tp(2x2) on 8 ranks: tensor2d blocks under zero3 (FSDP2 over a (dp, tp_rows, tp_cols) mesh), HSDP zero3
    (replicate 2: a 4-D mesh, FSDP2's largest) and ddp (DDP's local-tensor path for DTensor parameters); and
    tp=8 with two grid shapes (2 x 4, 4 x 2) in one model."""
    if dtype != "float64" or world_size not in (4, 8):
        return {}
    if world_size == 8:
        base = plan(GPT, "cpu", 8, mesh=(1, 2, 4))
        kinds = {"zero3": DataParallelPlan(kind="zero3"), "hsdp": DataParallelPlan(kind="zero3", replicate=2),
                 "ddp": DataParallelPlan(kind="ddp")}  # zero1 and zero2 also match (checked once; not rerun for time)
        plans = {}
        for name, data_parallel in kinds.items():
            plans[f"tp2d_{name}"] = force_tensor_2d(copy.deepcopy(base), 2)
            plans[f"tp2d_{name}"].data_parallel = data_parallel
        # tp=8 on the same 8 ranks: blocks on a 2 x 4 and a 4 x 2 grid of one model, zero3 over dp=1
        grids = force_tensor_2d(plan(GPT, "cpu", 8, mesh=(1, 1, 8)), 2, paths={"blocks.0", "blocks.1"})
        plans["tp2d_tp8_grids"] = force_tensor_2d(grids, 4, paths={"blocks.2", "blocks.3"})
        assert {layer.tp_rows for layer in plans["tp2d_tp8_grids"].layers} == {0, 2, 4}
        return plans
    base = plan(GPT, "cpu", 4, mesh=(1, 1, 4))
    mixed = force_tensor_2d(force_vocab_parallel(copy.deepcopy(base)), 2, paths={"blocks.1", "blocks.3"})
    for layer in mixed.layers:
        layer.sequence_parallel = layer.strategy == "tensor"
    techniques = force_tensor_2d(copy.deepcopy(base), 2)
    memory = {"blocks.0": ("selective", False), "blocks.1": ("full", False), "blocks.2": ("none", True),
              "blocks.3": ("full", True)}
    for layer in techniques.layers:
        layer.checkpoint, layer.offload_activations = memory.get(layer.path, ("none", False))
    techniques.pipeline.num_microbatches = 2
    techniques.data_parallel = DataParallelPlan(kind="zero3", offload=True)
    plans = {"tp2d_tp2x2": force_tensor_2d(copy.deepcopy(base), 2), "tp2d_mixed": mixed,
             "tp2d_techniques": techniques}
    for plan_obj in plans.values():
        plan_obj.validate("test")
    return plans


def tensor_2d_results(everything: dict) -> dict:
    results = {name: r for name, r in everything.items() if name.startswith("tp2d_")}
    assert results
    assert_parity(results)
    return results


def test_tensor_2d_matches_single_process(launches):
    """tensor_2d_plans on 4 ranks, float64 (1e-9), with the shards each grid placement gives."""
    results = tensor_2d_results(launches(4, "float64"))
    shards = results["tp2d_tp2x2"]["tp_shards"]
    assert shards["blocks.0.attn.q.weight"] == [1, 0] and shards["blocks.3.mlp.proj.bias"] == [None, 0], shards
    mixed_shards = results["tp2d_mixed"]["tp_shards"]
    assert mixed_shards["blocks.0.attn.q.weight"] == 0 and mixed_shards["blocks.1.attn.q.weight"] == [1, 0]
    assert mixed_shards["wte.weight"] == 0, mixed_shards


def test_tensor_2d_with_data_parallel_matches_single_process(launches):
    """tensor_2d_plans on 8 ranks (dp2 x tp(2x2) under zero3, HSDP and ddp; tp8 on two grids), float64 (1e-9),
    one launch of 2 steps."""
    results = tensor_2d_results(launches(8, "float64"))
    assert len(results) == 4, sorted(results)
    for name, result in results.items():
        assert result["tp_shards"]["blocks.0.mlp.fc.weight"] == [1, 0], (name, result["tp_shards"])


def sequence_parallel_plans(world_size: int, dtype: str) -> dict:
    """tp2 with sequence parallelism and selective checkpointing on every block."""
    if dtype != "float64" or world_size != 2:
        return {}
    plan_obj = force_tensor_parallel(plan(GPT, "cpu", 2, mesh=(1, 1, 2)))
    for layer in plan_obj.layers:
        layer.sequence_parallel = layer.strategy == "tensor"
        layer.checkpoint = "selective" if layer.strategy == "tensor" else "none"
        layer.offload_activations = False
    plan_obj.validate("test")
    return {"tsp_selective": plan_obj}


def test_tensor_sequence_parallel_selective_checkpoint_matches_single_process(launches):
    """Megatron's layer recipe on one layer: tp2 with sequence parallelism and selective checkpointing (op-level
    SAC, runtime/memory_techniques.py) on every block, float64 (1e-9) against one process. The planner offers
    it, and prices its kept activations below plain tensor parallelism's with selective checkpointing (the layer
    input and the matmul outputs outside units are sequence shards)."""
    from costmodel import load_cluster
    from planner.evaluate_config import ConfigPricer
    from planner.model_graph import build_model_graph
    from planner.model_spec import load_model_spec
    from planner.recost import recost_plan

    spec = load_model_spec(GPT, device="meta")
    graph = build_model_graph(spec)
    pricer = ConfigPricer(spec.model, graph, load_cluster("cpu").for_world_size(2))
    block = [layer.path for layer in graph.layers].index("blocks.0")
    costs = {o.label: c for o, c in pricer.micro_options(block, 2, 8, "float32")}
    assert costs["tensor+sp+ckpt-selective"].activation_bytes < costs["tensor+ckpt-selective"].activation_bytes
    assert costs["tensor+sp+ckpt-selective"].recompute_s < costs["tensor+sp+ckpt-full"].recompute_s
    plan_obj = sequence_parallel_plans(2, "float64")["tsp_selective"]
    recosted = recost_plan(plan_obj, spec.model, graph, load_cluster("cpu").for_world_size(2))  # the search's pricer
    assert recosted.prediction.step_time_ms > 0
    assert_parity({"tsp_selective": launches(2, "float64")["tsp_selective"]})


PLAN_BUILDERS = (gpt_plans, vocab_plans, tensor_2d_plans, sequence_parallel_plans)
"""Each maps (world size, dtype) to the plans it contributes to that launch (none when it has no such plan)."""
