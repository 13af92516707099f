"""tensor2d refusals (runtime/tensor_parallel_2d.py): a micro-batch the grid's rows cannot split, before launch and
in the forward, and linears whose features the grid cannot split; one process, fake backend of 4 ranks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from test_parity import GPT, force_tensor_2d
from torch import nn
from torch.testing._internal.distributed.fake_pg import FakeStore

from planner.api import plan
from planner.model_spec import load_model_spec
from planner.plan_schema import PlanError
from runtime.parallelize import forward_context
from runtime.tensor_parallel_2d import apply_tensor_parallel_2d
from runtime.train import build_mesh, check_runtime_supports


@pytest.fixture(scope="module")
def grid_plan():
    return force_tensor_2d(plan(GPT, "cpu", 4, mesh=(1, 1, 4)), 2)


@pytest.fixture
def fake_world():
    dist.init_process_group("fake", rank=0, world_size=4, store=FakeStore())
    yield
    dist.destroy_process_group()


def test_refuses_a_micro_batch_the_rows_cannot_split_before_launch(grid_plan):
    plan_obj = copy.deepcopy(grid_plan)
    check_runtime_supports(plan_obj)  # 8 samples over 2 rows: accepted
    plan_obj.pipeline.num_microbatches = 8  # 1 sample per micro-batch
    with pytest.raises(PlanError, match=r"layer blocks.0: strategy 'tensor2d' splits the batch over tp_rows=2, "
                                        r"but the micro-batch has 1 samples .*choose tp_rows dividing 1"):
        check_runtime_supports(plan_obj)


def test_refuses_an_odd_batch_in_the_forward(grid_plan, fake_world):
    spec = load_model_spec(grid_plan.model.source, device=torch.device("cpu"))
    apply_tensor_parallel_2d(spec.model, grid_plan, build_mesh(grid_plan, torch.device("cpu"))["tp"])
    tokens = torch.zeros(3, 8, dtype=torch.long)
    with forward_context(grid_plan), pytest.raises(PlanError, match="micro-batch has 3 samples"):
        spec.model(tokens)


def test_refuses_features_the_grid_cannot_split(grid_plan, fake_world):
    spec = load_model_spec(grid_plan.model.source, device=torch.device("cpu"))
    spec.model.blocks[0].mlp.fc = nn.Linear(64, 255)  # 255 outputs over 2 columns
    spec.model.blocks[0].mlp.proj = nn.Linear(255, 64)
    with pytest.raises(PlanError, match=r"layer blocks.0: tensor2d shards mlp.fc's 64 input features over "
                                        r"tp_rows=2 and its 255 output features over tp / tp_rows=2"):
        apply_tensor_parallel_2d(spec.model, grid_plan, build_mesh(grid_plan, torch.device("cpu"))["tp"])
