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
