"""Relay values that skip pipeline stages through the stages in between.

torch.distributed.pipelining sends activations only from a stage to the next one. Models often make a value
once and use it in every layer (Llama's rotary tables, computed in the root forward and passed to each block),
so after cutting, stage 3 may take a value made on stage 0: a skip connection the schedules refuse mid-run. This
rewrites the traced `Pipe` so each stage in between takes the value as one more input and returns it unchanged
as one more output; every value then moves one stage at a time, by torch's own send/recv, and its gradient
(when it has one) flows back the same way.

The rewrite touches only fx graphs: the split graph (`pipe.split_gm`, which `_PipelineStage` reads to plan the
communication) and the stage modules' graphs (a new placeholder, and the output tuple grown by one). torch's
traced stage reads output index i of a stage from its i-th `getitem` user, so new getitems go after the
existing ones.

Order matters too: a stage sends its outputs in output order, and the next stage posts its receives in the order
of its inputs (placeholders); torch.distributed.pipelining gives every message between two ranks the same tag,
so the transport matches them by order. When the export lists a stage's inputs in another order than its
neighbour returns them (Llama's rotary embedding alone on a stage returns cos, sin, then the relayed hidden
states; the next block takes the hidden states first), the receives get messages of another size and gloo
aborts ("Received data size doesn't match expected size"; same-sized values would silently swap).
`order_inputs_as_sent` permutes each stage's inputs into its neighbour's output order.

Layout matters as well: gloo sends and receives only contiguous tensors, and torch builds receive buffers with
the strides the export recorded. ConvNeXt's stage outputs are channels-last views (`permute` around its
LayerNorm), so `make_boundaries_contiguous` makes every value that leaves a stage contiguous, in the graph
and in the recorded shapes both sides read.
"""

from __future__ import annotations

import operator

from torch import fx


def _source(value: fx.Node) -> fx.Node:
    while value.op == "call_function" and value.target is operator.getitem:
        value = value.args[0]
    return value


def _output_node(graph: fx.Graph) -> fx.Node:
    return next(node for node in graph.nodes if node.op == "output")


def produced_value(pipe, value: fx.Node) -> fx.Node:
    """The node inside the producing stage's graph that `value` (a node of the split graph) stands for."""
    if value.op == "call_function" and value.target is operator.getitem:
        outputs = _output_node(pipe.split_gm.get_submodule(value.args[0].target).graph).args[0]
        return outputs[value.args[1]]
    if value.op == "call_module":
        return _output_node(pipe.split_gm.get_submodule(value.target).graph).args[0]
    return value


def _pass_through(pipe, call: fx.Node, value: fx.Node) -> fx.Node:
    """Make stage `call` take `value` as a last input and return it as a last output; returns the split-graph
    node for that new output."""
    module = pipe.split_gm.get_submodule(call.target)
    graph = module.graph
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    if value in call.args:  # the stage takes it already (placeholders and call args are 1:1): one receive
        relayed = placeholders[call.args.index(value)]
    else:
        with graph.inserting_after(placeholders[-1]):
            relayed = graph.placeholder(f"relayed_{value.name}")
        relayed.meta["val"] = produced_value(pipe, value).meta["val"]
        call.args = (*call.args, value)
    output = _output_node(graph)
    outputs = output.args[0]
    single = not isinstance(outputs, (tuple, list))
    outputs = ((outputs,) if single else tuple(outputs)) + (relayed,)
    output.args = (outputs,)
    module.recompile()

    split_graph = pipe.split_gm.graph
    if single:  # its users took the whole output; now they take item 0
        users = list(call.users)
        with split_graph.inserting_after(call):
            first = split_graph.call_function(operator.getitem, (call, 0))
        for user in users:
            user.replace_input_with(call, first)
    last = [user for user in call.users if user.target is operator.getitem][-1]
    with split_graph.inserting_after(last):
        return split_graph.call_function(operator.getitem, (call, len(outputs) - 1))


def relay_skipping_values(pipe) -> int:
    """Route every value a stage takes from an earlier, non-neighbouring stage through the stages in between.

    Model inputs used past stage 0 are left alone (the first stage alone receives them). Returns how many
    stage inputs were rerouted.
    """
    split_graph = pipe.split_gm.graph
    calls = [node for node in split_graph.nodes if node.op == "call_module"]
    stage_of = {node: stage for stage, node in enumerate(calls)}
    carriers: dict[tuple[fx.Node, int], fx.Node] = {}
    rerouted = 0
    for stage, call in enumerate(calls):
        for value in list(call.all_input_nodes):
            made_on = stage_of.get(_source(value))
            if made_on is None or made_on >= stage - 1:
                continue
            carrier = value
            for between in range(made_on + 1, stage):
                if (value, between) not in carriers:
                    carriers[(value, between)] = _pass_through(pipe, calls[between], carrier)
                carrier = carriers[(value, between)]
            call.replace_input_with(value, carrier)
            rerouted += 1
    split_graph.lint()
    pipe.split_gm.recompile()
    return rerouted


def _sent_position(value: fx.Node) -> int:
    """The position in its producer's outputs of a stage input (a whole-output value counts as position 0)."""
    if value.op == "call_function" and value.target is operator.getitem:
        return value.args[1]
    return 0


def order_inputs_as_sent(pipe) -> int:
    """Permute every stage's inputs (split-graph call arguments and the stage graph's placeholders together)
    into the order the stage before it sends them. Returns how many stages were reordered.

    Run after `relay_skipping_values`, when every stage but the first takes only its neighbour's outputs.
    """
    calls = [node for node in pipe.split_gm.graph.nodes if node.op == "call_module"]
    reordered = 0
    for call in calls[1:]:
        order = sorted(range(len(call.args)), key=lambda i: _sent_position(call.args[i]))
        if order == list(range(len(call.args))):
            continue
        module = pipe.split_gm.get_submodule(call.target)
        placeholders = [node for node in module.graph.nodes if node.op == "placeholder"]
        first_body = placeholders[-1].next
        for index in order:  # move each placeholder, in the new order, in front of the body
            first_body.prepend(placeholders[index])
        module.recompile()
        call.args = tuple(call.args[i] for i in order)
        reordered += 1
    pipe.split_gm.graph.lint()
    pipe.split_gm.recompile()
    return reordered


def _contiguous_val(node: fx.Node) -> None:
    val = node.meta.get("val")
    if val is not None and hasattr(val, "is_contiguous") and not val.is_contiguous():
        node.meta["val"] = val.contiguous()


def make_boundaries_contiguous(pipe) -> int:
    """Make every tensor a stage returns contiguous (a `.contiguous()` before the output, a no-op for values
    that already are) and record contiguous strides for the outputs and for the next stages' inputs. Returns
    how many stage outputs were not contiguous."""
    changed = 0
    for call in [node for node in pipe.split_gm.graph.nodes if node.op == "call_module"]:
        module = pipe.split_gm.get_submodule(call.target)
        graph = module.graph
        output = _output_node(graph)
        outputs = output.args[0]
        single = not isinstance(outputs, (tuple, list))
        items = [outputs] if single else list(outputs)
        fixed = []
        for item in items:
            val = item.meta.get("val") if isinstance(item, fx.Node) else None
            if val is None or not hasattr(val, "is_contiguous") or val.is_contiguous():
                fixed.append(item)
                continue
            with graph.inserting_before(output):
                made = graph.call_method("contiguous", (item,))
            made.meta = dict(item.meta, val=val.contiguous())
            fixed.append(made)
            changed += 1
        output.args = (fixed[0] if single else type(outputs)(fixed),)
        module.recompile()
        for placeholder in (node for node in graph.nodes if node.op == "placeholder"):
            _contiguous_val(placeholder)
    return changed
