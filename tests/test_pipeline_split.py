"""Cutting a model into pipeline stages (no process group): FQNs, numerics of the chained stages, and the
PlanErrors for pipeline plans the runtime cannot run."""

from __future__ import annotations

import copy
import operator
from pathlib import Path

import pytest
import torch
from test_pipeline_parity import FOUR_STAGES, GPT, LLAMA, TWO_STAGES, pipeline_plan

from planner.api import plan
from planner.model_spec import load_model_spec
from planner.plan_schema import PlanError
from runtime.pipeline import check_pipeline_supported, split_spec_for, stage_ids_on_rank, trace_pipeline
from runtime.traced_linear import linear_features
from runtime.train import check_runtime_supports

ROOT = Path(__file__).resolve().parents[1]
MODELS = f"{ROOT}/tests/models.py"


def test_stages_keep_fqns_and_chain_to_the_model_output():
    pipe_plan = pipeline_plan(GPT, 2, 1, 1, "interleaved_1f1b", 4, FOUR_STAGES)
    torch.manual_seed(0)
    spec = load_model_spec(GPT)
    original = copy.deepcopy(spec.model)
    (tokens,), _ = spec.make_batch(pipe_plan.micro_batch_size, 0)
    pipe = trace_pipeline(pipe_plan, spec)
    x, names = tokens, set()
    for stage in range(pipe_plan.num_stages):
        module = pipe.get_stage_module(stage)
        layers = {layer.path for layer in pipe_plan.layers if layer.stage == stage}
        owners = {next((layer for layer in layers if name.startswith(layer + ".")), name)
                  for name, _ in module.named_parameters()}
        assert owners == layers, (stage, owners)  # every GPT layer owns parameters
        names |= {name for name, _ in module.named_parameters()}
        x = module(x)
    assert names == {name for name, _ in original.named_parameters()}
    torch.testing.assert_close(x, original(tokens), rtol=0, atol=0)
    assert stage_ids_on_rank(pipe_plan, 0) == [0, 2] and stage_ids_on_rank(pipe_plan, 1) == [1, 3]
    assert linear_features(pipe.get_stage_module(1).get_submodule("blocks.1.mlp.fc")) == (64, 256)
    assert linear_features(pipe.get_stage_module(1).get_submodule("blocks.1.ln_1")) is None


def test_runtime_accepts_pipeline_plans():
    check_runtime_supports(pipeline_plan(GPT, 2, 1, 1, "1f1b", 2, TWO_STAGES))


def test_tied_weight_across_stages_is_refused():
    pipe_plan = pipeline_plan(GPT, 2, 1, 1, "1f1b", 2, TWO_STAGES)
    with pytest.raises(PlanError, match="head.weight is used on stages 0 and 1 .*same stage"):
        trace_pipeline(pipe_plan, load_model_spec(f"{MODELS}:build_tied_gpt"))


def test_stage_cannot_start_with_a_layer_that_runs_first_and_again():
    reuse_plan = plan(f"{MODELS}:build_reused_linear", "cpu", 1)
    assert [layer.path for layer in reuse_plan.layers] == ["b", "a", "c"]  # chain in order of first use
    by_path = {layer.path: layer for layer in reuse_plan.layers}
    reuse_plan.layers = [by_path["a"], by_path["b"], by_path["c"]]  # a person's edit: b starts stage 1
    for layer, stage in zip(reuse_plan.layers, (0, 1, 1), strict=True):
        layer.stage = stage
    reuse_plan.world_size, reuse_plan.mesh.pp = 2, 2
    reuse_plan.pipeline.schedule, reuse_plan.pipeline.num_microbatches = "1f1b", 2
    reuse_plan.validate("test")
    with pytest.raises(PlanError, match="cannot start a stage; move the layers' 'stage' boundary"):
        trace_pipeline(reuse_plan, load_model_spec(f"{MODELS}:build_reused_linear"))


def test_values_skipping_stages_are_relayed_through_the_stages_between():
    """Llama's rotary tables are made in the root forward (stage 0) and taken by every block: with blocks on
    stages 1, 2 and 3, stages 1 and 2 must pass them on, since torch's schedules only send to the next stage."""
    pipe_plan = pipeline_plan(LLAMA, 2, 1, 1, "interleaved_1f1b", 2, ("layers.1", "layers.2", "layers.3"))
    torch.manual_seed(0)
    spec = load_model_spec(LLAMA)
    original = copy.deepcopy(spec.model)
    (tokens,), _ = spec.make_batch(pipe_plan.micro_batch_size, 0)
    pipe = trace_pipeline(pipe_plan, spec)
    calls = [node for node in pipe.split_gm.graph.nodes if node.op == "call_module"]
    assert [len(call.args) for call in calls] == [1, 3, 3, 3]  # stages 2 and 3 get cos, sin from 1 and 2
    values = (tokens,)
    for stage in range(pipe_plan.num_stages):
        out = pipe.get_stage_module(stage)(*values)
        values = out if isinstance(out, tuple) else (out,)
    torch.testing.assert_close(values[0], original(tokens), rtol=0, atol=0)


def test_stage_inputs_are_received_in_the_order_the_stage_before_sends_them():
    """The planner's own 2 x 2 x 1 plan for transformers' Llama puts the rotary embedding alone on stage 1; it
    returns (cos, sin, relayed hidden states) and the export lists the next block's inputs as (hidden, cos, sin).
    The schedule sends outputs in output order and receives in input order with one tag, so every stage's
    inputs must follow its neighbour's outputs (else gloo aborts on the size mismatch); and the chained stages
    still compute the model."""
    planned = plan(f"{ROOT}/examples/hf_llama.py:build_hf_llama", "cpu", 4, mesh=(2, 2, 1))
    assert [layer.path for layer in planned.layers if layer.stage == 1] == ["llama.model.rotary_emb"]
    torch.manual_seed(0)
    spec = load_model_spec(planned.model.source)
    original = copy.deepcopy(spec.model)
    (tokens,), _ = spec.make_batch(planned.micro_batch_size, 0)
    pipe = trace_pipeline(planned, spec)
    calls = [node for node in pipe.split_gm.graph.nodes if node.op == "call_module"]
    for previous, call in zip(calls, calls[1:], strict=False):
        sent = [user for user in previous.users if user.target is operator.getitem] or [previous]
        assert list(call.args) == sorted(sent, key=lambda node: node.args[1] if node is not previous else 0), call
    values = (tokens,)
    for stage in range(planned.num_stages):
        out = pipe.get_stage_module(stage)(*values)
        values = out if isinstance(out, tuple) else (out,)
    torch.testing.assert_close(values[0], original(tokens), rtol=0, atol=0)


def test_values_between_stages_are_contiguous(start="convnext.convnext.encoder.stages.1"):
    """ConvNeXt's blocks return channels-last views (a permute around their LayerNorm); gloo's isend refuses
    non-contiguous tensors and torch builds receive buffers with the traced strides, so every value that
    crosses a stage boundary is made contiguous on both sides, and the chained stages still compute the model."""
    pipe_plan = pipeline_plan(f"{ROOT}/tests/zoo_models.py:build_convnext", 2, 1, 1, "1f1b", 2, (start,))
    torch.manual_seed(0)
    spec = load_model_spec(pipe_plan.model.source)
    original = copy.deepcopy(spec.model)
    (images,), _ = spec.make_batch(pipe_plan.micro_batch_size, 0)
    pipe = trace_pipeline(pipe_plan, spec)
    values = (images,)
    for stage in range(pipe_plan.num_stages):
        graph = pipe.get_stage_module(stage).graph
        boundary = [node.meta["val"] for node in graph.nodes if node.op == "placeholder"] if stage else []
        output = next(node for node in graph.nodes if node.op == "output").args[0]
        boundary += [node.meta["val"] for node in (output if isinstance(output, (tuple, list)) else [output])]
        assert all(val.is_contiguous() for val in boundary), (stage, [val.stride() for val in boundary])
        out = pipe.get_stage_module(stage)(*values)
        values = out if isinstance(out, tuple) else (out,)
        assert all(value.is_contiguous() for value in values)
    torch.testing.assert_close(values[0], original(images), rtol=0, atol=0)


def test_model_inputs_past_the_first_stage_are_refused():
    skip_plan = plan(f"{MODELS}:build_input_skip", "cpu", 1)
    assert [layer.path for layer in skip_plan.layers] == ["a", "b", "c"]
    for layer, stage in zip(skip_plan.layers, (0, 1, 1), strict=True):
        layer.stage = stage
    skip_plan.world_size, skip_plan.mesh.pp = 2, 2
    skip_plan.pipeline.schedule, skip_plan.pipeline.num_microbatches = "1f1b", 2
    skip_plan.validate("test")
    with pytest.raises(PlanError, match="stage 1 uses 'x', which is a model input, not on stage 0"):
        trace_pipeline(skip_plan, load_model_spec(f"{MODELS}:build_input_skip"))


def test_micro_batches_must_divide_the_dp_rank_batch():
    pipe_plan = pipeline_plan(GPT, 2, 1, 1, "1f1b", 2, TWO_STAGES)
    pipe_plan.pipeline.num_microbatches = 3  # Plan.validate would refuse it too; the runtime checks on its own
    with pytest.raises(PlanError, match=r"pipeline.num_microbatches=3 does not divide .* \(8 / dp=1 = 8\)"):
        trace_pipeline(pipe_plan, load_model_spec(GPT))


def test_unsupported_pipeline_plans_are_refused_before_building():
    pipe_plan = pipeline_plan(GPT, 2, 2, 1, "1f1b", 2, TWO_STAGES)
    for kind in ("ddp", "zero1", "zero2", "zero3"):  # every data-parallel kind runs under a pipeline
        pipe_plan.data_parallel.kind = kind
        check_pipeline_supported(pipe_plan)
    pipe_plan = pipeline_plan(GPT, 2, 1, 1, "1f1b", 2, TWO_STAGES)
    assert pipe_plan.layers[4].path == "blocks.2"
    pipe_plan.layers[4].path = ""
    with pytest.raises(PlanError, match="can only cut between named layers"):
        split_spec_for(pipe_plan)
    assert list(split_spec_for(pipeline_plan(GPT, 2, 1, 1, "1f1b", 2, TWO_STAGES))) == ["blocks.2"]
