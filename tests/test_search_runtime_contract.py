"""The runtime accepts every plan the search can emit.

Every configuration the search enumerates for 4 and 8 ranks (mesh, micro-batching, schedule, virtual stages,
data-parallel flavour, HSDP across two nodes, state offload, mixed precision) is solved exactly and written as a
Plan the way `plan()` writes its winner; each must validate and pass the runtime's own pre-flight checks, and so
must the same plan with any layer option the search offered under that configuration (strategy, grid,
checkpointing, offload, sequence parallelism) taken by every layer that was offered it. The
parity tests then show the shapes train like one process; this test makes sure no shape the search can pick is
one the runtime would refuse.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
from test_search import GPT

from costmodel import load_cluster
from planner.api import layer_plan_of, plan_from_search
from planner.config_space import enumerate_configs
from planner.evaluate_config import ConfigPricer
from planner.model_graph import build_model_graph
from planner.model_spec import load_model_spec
from planner.search import SearchResult
from runtime.train import check_runtime_supports


def _check_every_offered_option(emitted, graph, pricer: ConfigPricer, config) -> set:
    """For each option some layer is offered under `config`: the emitted plan with every layer that offers it
    taking it validates and passes the runtime's checks. Returns the options seen."""
    offered = [{p.option for p in pricer.priced_options(i, config)} for i in range(len(graph.layers))]
    for option in set().union(*offered):
        edited = copy.deepcopy(emitted)
        edited.layers = [layer_plan_of(facts, option, layer.stage) if option in choices else layer
                         for layer, facts, choices in zip(edited.layers, graph.layers, offered, strict=True)]
        edited.validate(f"{config.summary} with {option.label}")
        check_runtime_supports(edited)
    return set().union(*offered)


@pytest.fixture(scope="module")
def traced():
    spec = load_model_spec(GPT, device="meta")
    return spec, build_model_graph(spec)


@pytest.mark.parametrize(("world_size", "param_dtype"), [(4, "float32"), (8, "bfloat16")])
def test_every_searchable_configuration_is_runnable(traced, world_size, param_dtype):
    spec, graph = traced
    # 4 CPU "devices" per node, so that 8 ranks span two nodes and HSDP is in the space too
    cluster = dataclasses.replace(load_cluster("cpu"), devices_per_node=4).for_world_size(world_size)
    pricer = ConfigPricer(spec.model, graph, cluster)
    configs = enumerate_configs(world_size, cluster.devices_per_node, len(graph.layers), spec.global_batch_size,
                                param_dtype, host_offload=cluster.host_link is not None)
    shapes, offered = set(), set()
    for config in configs:
        screened = pricer.screen(config)
        if not screened.feasible:
            continue
        exact = pricer.solve(screened)
        if not exact.feasible:
            continue
        found = SearchResult(best=exact, alternatives=[], configs_total=1, configs_screened=1, configs_solved=1)
        emitted = plan_from_search(GPT, graph, cluster, world_size, spec.global_batch_size, found)
        emitted.validate(config.summary)
        check_runtime_supports(emitted)
        offered |= _check_every_offered_option(emitted, graph, pricer, config)
        shapes.add((config.pp > 1, config.tp > 1, config.dp_kind, config.replicate > 1, config.offload))
    # the walk covered pipelines, tensor parallelism, every flavour, HSDP and offload, and every layer option
    assert {"replicate", "tensor", "tensor2d", "vocab"} <= {o.strategy for o in offered}
    assert {"none", "selective", "full"} <= {o.checkpoint for o in offered}
    assert any(o.sequence_parallel for o in offered) and any(o.offload_activations for o in offered)
    assert {s[2] for s in shapes} == {"ddp", "zero1", "zero2", "zero3"}
    assert any(s[0] for s in shapes) and any(s[1] for s in shapes)
    assert any(s[3] for s in shapes) == (cluster.num_nodes > 1)
    assert any(s[4] for s in shapes) == (cluster.host_link is not None)


PIPELINE_MODELS = ["qwen2"]
"""Zoo decoders whose every pipeline cut is checked (rotary tables relayed, a rotary embedding alone on a stage);
`mixtral` passes too but doubles the time (each cut is a torch.export)."""


@pytest.mark.parametrize("name", PIPELINE_MODELS)
def test_every_pipeline_cut_the_partitioner_may_choose_runs(name):
    """Every place the partitioner may start a stage of a real model (`allowed_stage_starts`) gives stages the
    runtime can run: the cut traces (torch.export splitting, relays, the neighbour check), every stage takes its
    inputs in the order the stage before sends them, every value crossing a boundary is contiguous, and the
    chained stages' forward and backward equal the model's (one process; the zoo's pp2 x dp2 plans run the
    planner's own cuts on ranks, tests/test_zoo.py)."""
    import operator

    import torch
    from zoo_plans import model_source

    from planner.evaluate_config import allowed_stage_starts
    from planner.plan import Plan
    from runtime.pipeline import trace_pipeline

    source = model_source(name)
    meta = load_model_spec(source, device="meta")
    graph = build_model_graph(meta)
    base = plan_from_search(source, graph, load_cluster("cpu").for_world_size(1), 1, meta.global_batch_size,
                            SearchResult(best=_single_rank_result(meta, graph), alternatives=[], configs_total=1,
                                         configs_screened=1, configs_solved=1))
    starts = [start for start in allowed_stage_starts(meta.model, graph.layers) if start > 0]
    assert len(starts) == len(graph.layers) - 1  # untied: every layer after the first may start a stage
    for start in starts:
        cut = Plan.from_yaml(base.to_yaml())
        cut.world_size, cut.mesh.pp = 2, 2
        cut.pipeline.schedule, cut.pipeline.num_microbatches = "1f1b", 2
        for index, layer in enumerate(cut.layers):
            layer.stage = int(index >= start)
        cut.validate(f"{name} cut before {cut.layers[start].path}")
        check_runtime_supports(cut)
        torch.manual_seed(0)
        spec = load_model_spec(source)
        (tokens,), targets = spec.make_batch(cut.micro_batch_size, 0)
        expected = spec.loss_fn(spec.model(tokens), targets)
        expected.backward()
        reference = {n: p.grad.clone() for n, p in spec.model.named_parameters()}
        spec.model.zero_grad()
        pipe = trace_pipeline(cut, spec)
        first, second = pipe.get_stage_module(0), pipe.get_stage_module(1)
        call = [node for node in pipe.split_gm.graph.nodes if node.op == "call_module"][1]
        assert [a.args[1] if a.target is operator.getitem else 0 for a in call.args] == list(range(len(call.args)))
        sent = first(tokens)
        sent = sent if isinstance(sent, tuple) else (sent,)
        assert all(t.is_contiguous() for t in sent)
        loss = spec.loss_fn(second(*sent), targets)
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
        loss.backward()
        grads = {n: p.grad for m in (first, second) for n, p in m.named_parameters()}
        assert set(grads) == set(reference)
        for n, grad in grads.items():
            torch.testing.assert_close(grad, reference[n], rtol=1e-5, atol=1e-7, msg=f"{name} cut {start}: {n}")


def _single_rank_result(spec, graph):
    """The exact solution of the one-rank configuration (a plan to edit cuts into)."""
    cluster = load_cluster("cpu").for_world_size(1)
    pricer = ConfigPricer(spec.model, graph, cluster)
    config = next(c for c in enumerate_configs(1, cluster.devices_per_node, len(graph.layers),
                                               spec.global_batch_size, "float32", host_offload=False))
    return pricer.solve(pricer.screen(config))
