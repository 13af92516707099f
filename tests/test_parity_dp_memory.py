"""Numerics parity and memory effect of the data-parallel kinds and per-layer memory techniques on 4 gloo ranks
(HSDP 2 x 2 with tp 2 on 8).

Each group of plans shares one torchrun launch (tests/parity_worker.py runs them one after the other with the
runtime's own `forward_backward` and optimizer); every plan runs 4 AdamW steps beside a single-process
reference and reports rank 0's peak memory by category (MemTracker) on the second step.

Tolerances (relative error of the difference's norm, per tensor; loss per step):
- float64 groups: loss, gradients and parameters within 1e-9. Reduction order is the only difference for every
  technique here (sharding, all-reduce vs reduce-scatter, recomputation, micro-batch accumulation), so anything
  larger is a bug; measured ~5e-14.
- bfloat16 group (float32 master weights): the reference follows the same low-precision semantics on each dp
  rank's slice and averages gradients in fp32 (see parity_worker.reference_forward_backward), so only the fp32
  order of the gradient reduction differs: loss, parameters and the first step's gradients 1e-5 (measured
  <= 7.3e-6). Gradients of later steps 2e-3: once the parameters differ in their last fp32 bits (after the
  first AdamW step), a bf16 cast in the forward can round an element the other way, which moves the gradient
  by a bf16 step (measured 8.3e-4 for blocks.2.attn.q.weight at step 3 with the initial weights of
  runtime/materialize.py, <= 1.1e-7 at steps 0-2). A computation in the wrong dtype differs by a bf16
  rounding step on every element from the first step on.
"""

from __future__ import annotations

import pytest
from test_parity import GPT, force_tensor_parallel, run_parity

from planner.api import plan

STEPS = 4
EXACT = {"loss": 1e-9, "grad": 1e-9, "param": 1e-9}
BF16 = {"loss": 1e-5, "grad": 2e-3, "param": 1e-5}
FIRST_STEP_GRAD = {"float64": 1e-9, "float32": 1e-5}
"""Gradients of the first step, from identical parameters (see the module docstring)."""


def make_plan(mesh, kind="zero3", replicate=1, reshard_after_forward=True, offload=False, param_dtype="float32",
              num_microbatches=1, checkpoint="none", offload_activations=False, sequence_parallel=False):
    """A GPT plan for pp x dp x tp CPU ranks, edited as a person would edit the YAML."""
    plan_obj = plan(GPT, "cpu", mesh[0] * mesh[1] * mesh[2], mesh=mesh)
    if mesh[2] > 1:
        plan_obj = force_tensor_parallel(plan_obj)
    dpp = plan_obj.data_parallel
    dpp.kind, dpp.replicate, dpp.reshard_after_forward, dpp.offload = kind, replicate, reshard_after_forward, offload
    plan_obj.precision.param_dtype = param_dtype
    plan_obj.pipeline.num_microbatches = num_microbatches
    for layer in plan_obj.layers:
        if layer.path.startswith("blocks."):
            layer.checkpoint, layer.offload_activations = checkpoint, offload_activations
        layer.sequence_parallel = sequence_parallel and layer.strategy == "tensor"
    plan_obj.validate()
    return plan_obj


DP4, DP2_TP2, DP4_TP2 = (1, 4, 1), (1, 2, 2), (1, 4, 2)
GROUPS = {
    "dp4": ("float64", {
        "ddp": dict(mesh=DP4, kind="ddp"),
        "zero1": dict(mesh=DP4, kind="zero1"),
        "zero2": dict(mesh=DP4, kind="zero2"),
        "zero3": dict(mesh=DP4),
        "zero3_keep_params": dict(mesh=DP4, reshard_after_forward=False),
        "hsdp_zero3": dict(mesh=DP4, replicate=2),
        "hsdp_zero2": dict(mesh=DP4, kind="zero2", replicate=2),
        "zero3_cpu_offload": dict(mesh=DP4, offload=True),
        "zero1_accumulate": dict(mesh=DP4, kind="zero1", num_microbatches=2),
        "hsdp_zero1": dict(mesh=DP4, kind="zero1", replicate=2),
    }),
    "dp2xtp2": ("float64", {
        "zero3": dict(mesh=DP2_TP2),
        "checkpoint_full": dict(mesh=DP2_TP2, checkpoint="full"),
        "checkpoint_selective": dict(mesh=DP2_TP2, checkpoint="selective"),
        "offload_activations": dict(mesh=DP2_TP2, offload_activations=True),
        "checkpoint_full_offload": dict(mesh=DP2_TP2, checkpoint="full", offload_activations=True),
        "checkpoint_selective_offload": dict(mesh=DP2_TP2, checkpoint="selective", offload_activations=True),
        "ddp": dict(mesh=DP2_TP2, kind="ddp"),
        "zero1": dict(mesh=DP2_TP2, kind="zero1"),
        "zero2": dict(mesh=DP2_TP2, kind="zero2"),
        "zero3_accumulate": dict(mesh=DP2_TP2, num_microbatches=2),
        "sequence_parallel": dict(mesh=DP2_TP2, sequence_parallel=True),
        "sequence_parallel_ddp_selective": dict(mesh=DP2_TP2, kind="ddp", sequence_parallel=True,
                                                checkpoint="selective"),
    }),
    "hsdp_tp": ("float64", {
        "zero3": dict(mesh=DP4_TP2, replicate=2),
        "zero2": dict(mesh=DP4_TP2, kind="zero2", replicate=2),
    }),
    "bf16": ("float32", {
        "zero3": dict(mesh=DP4, param_dtype="bfloat16"),
        "zero1": dict(mesh=DP4, kind="zero1", param_dtype="bfloat16"),
    }),
}
CASES = [(group, name) for group, (_, configs) in GROUPS.items() for name in configs]


@pytest.fixture(scope="module")
def group_results(tmp_path_factory):
    """Runs each group's launch the first time one of its tests asks for it."""
    cache = {}

    def results(group: str) -> dict:
        if group not in cache:
            dtype, configs = GROUPS[group]
            plans = {name: make_plan(**config) for name, config in configs.items()}
            cache[group] = run_parity(plans, tmp_path_factory.mktemp(group), dtype, STEPS)
        return cache[group]

    return results


@pytest.mark.parametrize(("group", "name"), CASES, ids=[f"{g}-{n}" for g, n in CASES])
def test_matches_single_process(group_results, group, name):
    result = group_results(group)[name]
    tolerance = BF16 if GROUPS[group][0] == "float32" else EXACT
    for quantity, limit in tolerance.items():
        assert result["worst"][quantity] < limit, (quantity, result)
    assert result["first_step_grad"] < FIRST_STEP_GRAD[GROUPS[group][0]], result


def memory(group_results, group: str, name: str) -> dict:
    return group_results(group)[name]["memory_bytes"]


def test_checkpointing_reduces_saved_activations(group_results):
    """Full checkpointing keeps only block inputs; selective keeps matmul outputs and recomputes the rest."""
    none = memory(group_results, "dp2xtp2", "zero3")["Activation"]
    full = memory(group_results, "dp2xtp2", "checkpoint_full")["Activation"]
    selective = memory(group_results, "dp2xtp2", "checkpoint_selective")["Activation"]
    assert full < 0.5 * none, (full, none)
    assert full < selective < none, (full, selective, none)


def test_sharding_divides_optimizer_states(group_results):
    """AdamW states: whole under ddp; ~1/4 under zero1/zero2/zero3 on dp4; ~1/2 under HSDP (2 x 2)
    (ZeroRedundancyOptimizer assigns whole tensors, so its share is only roughly 1/shard)."""
    ddp = memory(group_results, "dp4", "ddp")["Optstate"]
    for name in ("zero1", "zero2", "zero3"):
        assert memory(group_results, "dp4", name)["Optstate"] < 0.3 * ddp, name
    assert memory(group_results, "dp4", "hsdp_zero3")["Optstate"] == pytest.approx(ddp / 2, rel=0.01)
    assert memory(group_results, "dp4", "hsdp_zero1")["Optstate"] < 0.6 * ddp


def test_zero2_keeps_parameters_gathered(group_results):
    """zero2 (and zero3 without resharding) hold every layer's gathered parameters at the end of forward."""
    zero3 = memory(group_results, "dp4", "zero3")["Parameter"]
    assert memory(group_results, "dp4", "zero2")["Parameter"] > 1.5 * zero3
    assert memory(group_results, "dp4", "zero3_keep_params")["Parameter"] > 1.5 * zero3


def test_accumulation_halves_activations_and_defers_gradient_sync(group_results):
    """Two micro-batches per step: each forward holds half the batch's activations, and between them FSDP2 keeps
    unsharded gradients (sync off), more than the sharded gradients could take: AdamW's two states per
    parameter make the sharded parameter (= sharded gradient) bytes Optstate / 2."""
    whole = memory(group_results, "dp2xtp2", "zero3")
    halves = memory(group_results, "dp2xtp2", "zero3_accumulate")
    assert halves["Activation"] < 0.6 * whole["Activation"], (halves, whole)
    assert halves["Gradient"] > 1.4 * halves["Optstate"] / 2, halves


def test_sequence_parallel_shards_norm_and_residual_activations(group_results):
    plain = memory(group_results, "dp2xtp2", "zero3")["Activation"]
    sequence = memory(group_results, "dp2xtp2", "sequence_parallel")["Activation"]
    assert sequence < 0.95 * plain, (sequence, plain)
