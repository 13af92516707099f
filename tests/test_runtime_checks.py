"""The runtime refuses, before building anything, plan settings it cannot run, naming the field and the fix."""

from __future__ import annotations

import copy

import pytest
from test_parity import GPT

from planner.api import plan
from planner.plan_schema import PlanError
from runtime.train import check_runtime_supports


@pytest.fixture(scope="module")
def base_plan():
    return plan(GPT, "cpu", 4, mesh=(1, 4, 1))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda p: setattr(p.data_parallel, "kind", "zero1") or setattr(p.precision, "param_dtype", "bfloat16")
     or setattr(p.precision, "reduce_dtype", "bfloat16"), "gradient compression hooks need NCCL"),
    (lambda p: setattr(p.data_parallel, "kind", "ddp") or setattr(p.precision, "reduce_dtype", "float16"),
     "different from param_dtype"),
])
def test_refuses_what_it_cannot_run(base_plan, edit, message):
    plan_obj = copy_plan(base_plan)
    edit(plan_obj)
    with pytest.raises(PlanError, match=message):
        check_runtime_supports(plan_obj)


@pytest.mark.parametrize("kind", ["ddp", "zero1", "zero2", "zero3"])
def test_accepts_every_data_parallel_kind_with_techniques(base_plan, kind):
    plan_obj = copy_plan(base_plan)
    plan_obj.data_parallel.kind = kind
    plan_obj.precision.param_dtype = "bfloat16"
    plan_obj.pipeline.num_microbatches = 2
    plan_obj.layers[1].checkpoint = "selective"
    plan_obj.layers[1].offload_activations = True
    plan_obj.layers[2].offload_activations = True
    plan_obj.data_parallel.replicate = 1 if kind == "ddp" else 2
    check_runtime_supports(plan_obj)


def copy_plan(plan_obj):
    return copy.deepcopy(plan_obj)
