"""Vocabulary parallelism in the planner: which layers qualify, what the option costs, when the ILP takes it,
and the plan's and runtime's refusals (parity on gloo ranks: tests/test_parity.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from costmodel import load_cluster
from planner.api import plan
from planner.layer_options import LayerOption, layer_options, price_layer_option
from planner.model_graph import build_model_graph
from planner.model_spec import load_model_spec
from planner.plan import Plan
from planner.plan_schema import PlanError
from runtime.vocab_parallel import apply_vocab_parallel

ROOT = Path(__file__).resolve().parents[1]
GPT = f"{ROOT}/examples/gpt.py:build_gpt"
MODELS = f"{ROOT}/tests/models.py"


def layers_of(source: str) -> dict:
    return {layer.path: layer for layer in build_model_graph(load_model_spec(source, device="meta")).layers}


def test_embeddings_and_the_cross_entropy_head_qualify():
    layers = layers_of(GPT)
    assert {p: layer.vocab_parallel for p, layer in layers.items() if layer.vocab_parallel} == {
        "wte": "embedding", "wpe": "embedding", "head": "head"}
    head = layers["head"]
    # the head's weight, matmuls, logits and softmax all divide by tp: nearly the whole layer
    assert head.tp_num_params == head.num_params == 256 * 64
    assert head.tp_fwd_flops == head.fwd_flops > 0 and head.tp_saved_bytes > 0.99 * head.saved_bytes
    # backward all-reduces the input gradient (batch 8 x seq 32 x hidden 64 floats); forward 3 numbers per row
    assert head.vocab_backward_allreduce_bytes == 8 * 32 * 64 * 4
    assert head.vocab_forward_allreduce_bytes == 3 * 8 * 32 * 4
    assert layers["wte"].vocab_forward_allreduce_bytes == 8 * 32 * 64 * 4


def test_tied_weights_and_other_losses_do_not_qualify():
    tied = layers_of(f"{MODELS}:build_tied_gpt")
    assert not tied["wte"].vocab_parallel and not tied["head"].vocab_parallel
    assert tied["wpe"].vocab_parallel == "embedding"
    mse = layers_of(f"{MODELS}:build_mse_head_gpt")
    assert not mse["head"].vocab_parallel and mse["wte"].vocab_parallel == "embedding"


def test_vocab_option_divides_model_states_and_logits_and_pays_all_reduces():
    layers = layers_of(GPT)
    cluster = load_cluster("h100").for_world_size(8)
    head = layers["head"]
    assert LayerOption("vocab") in layer_options(head, False, cluster, vocab_parallel_ok=True)
    assert all(o.strategy != "vocab" for o in layer_options(head, False, cluster))
    replicated = price_layer_option(head, LayerOption("replicate"), 4, 1.0, cluster)
    sharded = price_layer_option(head, LayerOption("vocab"), 4, 1.0, cluster)
    assert sharded.local_num_params == replicated.local_num_params // 4
    assert sharded.activation_bytes < 0.3 * replicated.activation_bytes
    assert replicated.tp_communication_s == 0 < sharded.tp_communication_s
    embedding = price_layer_option(layers["wte"], LayerOption("vocab"), 4, 1.0, cluster)
    assert embedding.local_num_params == 256 * 64 // 4 and embedding.tp_communication_s > 0


def test_memory_pressure_makes_the_ilp_shard_the_vocabulary():
    # a vocabulary of 8192: embedding and head hold 85% of the weights; slow links make any sharding lose on
    # time, so with room nothing is sharded, and on a device with 40% of that memory the head and wte are
    wide = f"{MODELS}:build_wide_vocab_gpt"
    cluster_type = type(load_cluster("cpu"))
    slow = {**load_cluster("cpu").to_dict(), "intra_node": {"bandwidth_gb_per_s": 0.01, "latency_us": 10000}}
    roomy = plan(wide, cluster_type.from_dict(slow), 4, mesh=(1, 1, 4))
    assert all(layer.strategy == "replicate" for layer in roomy.layers)
    limit_gib = 0.4 * roomy.predicted.peak_memory_mib / 1024
    tight = plan(wide, cluster_type.from_dict({**slow, "device_memory_gib": limit_gib, "usable_memory_fraction": 1}),
                 4, mesh=(1, 1, 4))
    strategies = {layer.path: layer.strategy for layer in tight.layers}
    assert strategies["head"] == strategies["wte"] == "vocab"
    assert tight.predicted.peak_memory_mib <= tight.predicted.memory_limit_mib
    assert Plan.from_yaml(tight.to_yaml()) == tight


def test_pipelines_are_offered_vocab_parallelism():
    """pp2 x tp2: the head (last stage) and the embeddings (first stage) are offered `vocab` as without a
    pipeline (the runtime shards their traced stage modules, tests/test_pipeline_parity.py), and a plan that
    takes it validates and passes the runtime's checks; `vocab` with checkpointing is still refused."""
    from planner.evaluate_config import ConfigPricer
    from runtime.train import check_runtime_supports

    source = f"{MODELS}:build_wide_vocab_gpt"
    spec = load_model_spec(source, device="meta")
    pricer = ConfigPricer(spec.model, build_model_graph(spec), load_cluster("cpu"))
    from planner.config_space import enumerate_configs

    piped_config = enumerate_configs(4, 8, len(pricer.layers), spec.global_batch_size, mesh=(2, 1, 2))[0]
    for index in (0, len(pricer.layers) - 1):
        piped = {p.option.label for p in pricer.priced_options(index, piped_config)}
        assert "vocab" in piped, (pricer.layers[index].path, piped)
    result = plan(source, "cpu", 4, mesh=(2, 1, 2))
    for layer in (result.layers[0], result.layers[-1]):
        layer.strategy, layer.checkpoint, layer.offload_activations = "vocab", "none", False
    result.validate()
    check_runtime_supports(result)
    result.layers[-1].checkpoint = "full"
    with pytest.raises(PlanError, match=r"layers\[7\] \(head\) has strategy 'vocab'.*checkpoint"):
        result.validate()


@pytest.fixture(scope="module")
def gpt_plan_yaml() -> dict:
    return yaml.safe_load(plan(GPT, "cpu", 2, mesh=(1, 1, 2)).to_yaml())


@pytest.fixture
def gpt_plan(gpt_plan_yaml) -> Plan:
    return Plan.from_yaml(yaml.safe_dump(gpt_plan_yaml))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["layers"][0].update(strategy="vocab", checkpoint="full"), r"layers\[0\] \(wte\).*'vocab'"),
    (lambda d: d["layers"][-1].update(strategy="vocab", tensor_parallel=[{"colwise": ["a"], "rowwise": "b"}]),
     "takes no tensor_parallel units"),
])
def test_plan_refuses_vocab_with_what_it_cannot_combine(gpt_plan_yaml, edit, message):
    data = yaml.safe_load(yaml.safe_dump(gpt_plan_yaml))
    edit(data)
    with pytest.raises(PlanError, match=message):
        Plan.from_yaml(yaml.safe_dump(data))


@pytest.mark.parametrize("source, path, message", [
    (f"{MODELS}:build_tied_gpt", "head", "tied"),
    (GPT, "ln_f", "needs an nn.Embedding or an nn.Linear head, got a LayerNorm"),
    (GPT, "blocks.0", "got a Block"),
])
def test_runtime_refuses_layers_it_cannot_shard_on_the_vocabulary(gpt_plan, source, path, message):
    next(layer for layer in gpt_plan.layers if layer.path == path).strategy = "vocab"
    with pytest.raises(PlanError, match=message):
        apply_vocab_parallel(load_model_spec(source, device="meta").model, gpt_plan, tp_mesh=_FakeMesh(2))


def test_runtime_refuses_a_vocab_linear_that_is_not_the_head(gpt_plan):
    gpt_plan.layers[-1].strategy = "vocab"
    gpt_plan.layers.append(gpt_plan.layers.pop(-2))  # ln_f after the head
    with pytest.raises(PlanError, match="must be the output head"):
        apply_vocab_parallel(load_model_spec(GPT, device="meta").model, gpt_plan, tp_mesh=_FakeMesh(2))


class _FakeMesh:
    """The only thing the refusals read from a mesh is its size; no process group is needed for them."""

    def __init__(self, size: int):
        self._size = size

    def size(self) -> int:
        return self._size
