"""ModelGraph: the traced training step as a networkx graph, summarised per layer of the layer chain.

Nodes are aten ops of one forward + backward step (fx node names), with attributes:
  module_path, layer, phase ("forward"/"backward"), output_shapes, flops, bytes_accessed, saved_bytes.
Layers carry what the cost model needs: parameter count and bytes, FLOPs and memory traffic of forward and
backward, bytes autograd saves for backward, and which part of each is inside tensor-parallel units.
Identical layers (same class, parameter shapes and op sequence) share a `kind`, so each kind is costed once.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import nn
from torch.utils.flop_counter import flop_registry

from planner.capture import CapturedStep, capture_training_step
from planner.layer_chain import find_layer_chain, repeated_stack_path
from planner.linear_modules import is_linear_like
from planner.model_spec import ModelSpec
from planner.tensor_parallel_units import TensorParallelUnit, UnitLinearFacts, find_tensor_parallel_units
from planner.vocab_parallel import mark_vocab_parallel

_MATMUL_OPS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "convolution", "convolution_backward",
               "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
               "_scaled_dot_product_flash_attention_for_cpu"}


@dataclass(frozen=True)
class OpFacts:
    """One aten op of a layer, for per-op pricing (efficiency curves and launch overhead are per op)."""

    phase: str
    """"forward" or "backward"."""
    flops: float
    bytes_accessed: float
    """Bytes read + written when the op is not a matmul (memory-bound work); 0 for matmuls and views."""
    is_matmul: bool
    tensor_parallel: bool
    """Inside a tensor-parallel unit: its FLOPs and bytes divide by tp under the `tensor` strategy."""
    activation_bytes: float = 0.0
    """Matmuls only: bytes of the non-parameter operands read and the output written (they scale with the
    batch; weights do not and are left out), so a matmul whose output dwarfs its FLOPs (attention's q k^T over
    s x s scores with a small head dimension) is priced memory-bound by the roofline."""


@dataclass
class LayerFacts:
    """Per-layer totals for one traced step at `sample_batch_size` (FLOPs, traffic, activations scale with batch)."""

    path: str
    """Module path of the layer ("blocks.3")."""
    kind: str
    """Short hash shared by structurally identical layers."""
    num_params: int
    param_bytes: int
    fwd_flops: float = 0.0
    bwd_flops: float = 0.0
    fwd_bytes: float = 0.0
    """Bytes read + written by forward ops that are not matmuls (memory-bound work)."""
    bwd_bytes: float = 0.0
    saved_bytes: int = 0
    """Bytes autograd keeps from forward to backward (activations), counted once per storage."""
    matmul_saved_bytes: int = 0
    """The part of saved_bytes produced by matmul-class ops: what selective checkpointing keeps."""
    input_bytes: int = 0
    """Activations entering the layer from earlier layers or the batch: what full checkpointing keeps, and
    what a pipeline sends when a stage starts at this layer."""
    fwd_matmul_flops: float = 0.0
    """Forward FLOPs of matmul-class ops (selective checkpointing recomputes everything else)."""
    tp_units: list[TensorParallelUnit] = field(default_factory=list)
    tp_num_params: int = 0
    """Parameters inside tensor-parallel units (sharded by tp)."""
    tp_fwd_flops: float = 0.0
    tp_bwd_flops: float = 0.0
    tp_fwd_bytes: float = 0.0
    tp_bwd_bytes: float = 0.0
    tp_saved_bytes: int = 0
    tp_matmul_saved_bytes: int = 0
    tp_allreduce_bytes: int = 0
    """Bytes all-reduced per tensor-parallel step in forward (row outputs); backward all-reduces each column
    linear's input gradient (tp_linears)."""
    tp_linears: list[UnitLinearFacts] = field(default_factory=list)
    """Every linear of tp_units, in unit order: what their collectives move (planner/tensor_parallel_collectives.py)."""
    vocab_parallel: str = ""
    """`embedding` (an nn.Embedding layer) or `head` (an nn.Linear whose logits go straight into a cross-entropy
    loss): the layer can be sharded on the vocabulary (strategy `vocab`, planner/vocab_parallel.py); "" when
    not. The tp_* fields then describe the vocabulary-sharded part (such a layer has no tp_units)."""
    vocab_forward_allreduce_bytes: int = 0
    """Bytes all-reduced in forward under `vocab`: the embedding's output (partial sums of masked lookups), or
    the head's three per-row loss statistics (max, sum of exponentials, target logit)."""
    vocab_backward_allreduce_bytes: int = 0
    """Bytes all-reduced in backward under `vocab`: the head's input gradient (0 for an embedding)."""
    ops: list[OpFacts] = field(default_factory=list)
    """Every aten op of the layer (views included: each is one dispatch), in graph order."""


@dataclass
class ModelGraph:
    """The captured step as a graph plus its layer chain."""

    graph: nx.DiGraph
    layers: list[LayerFacts]
    sample_batch_size: int
    fingerprint: str
    num_params: int

    def kinds(self) -> dict[str, list[LayerFacts]]:
        """Layers grouped by kind, in chain order of first appearance."""
        groups: dict[str, list[LayerFacts]] = {}
        for layer in self.layers:
            groups.setdefault(layer.kind, []).append(layer)
        return groups


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _nbytes(value) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(value))


def _is_view(node: torch.fx.Node) -> bool:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return True  # getitem and friends move no data
    return any(ret.alias_info is not None for ret in target._schema.returns)


def _node_flops(node: torch.fx.Node) -> float:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return 0.0
    counter = flop_registry.get(target.overloadpacket)
    if counter is None:
        return 0.0
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
    return float(counter(*args, **kwargs, out_val=node.meta.get("val")))


def _activation_bytes(node: torch.fx.Node, param_storages: set) -> float:
    """Bytes a matmul node writes plus the bytes of its inputs that are not parameters (or views of them)."""
    inputs = [t for i in node.all_input_nodes for t in _tensors(i.meta.get("val"))
              if _storage_key(t) not in param_storages]
    return float(_nbytes(node.meta.get("val")) + sum(t.numel() * t.element_size() for t in inputs))


def _storage_key(tensor: torch.Tensor):
    try:
        return tensor.untyped_storage()._cdata
    except (NotImplementedError, RuntimeError):
        return id(tensor)


def build_model_graph(spec: ModelSpec, sample_batch_size: int | None = None) -> ModelGraph:
    """Capture `spec`'s training step on fake tensors and summarise it per layer.

    A deep stack of identical blocks (96 in GPT-3) is traced with only three: tracing cost grows with depth,
    and the middle one (fed by a block, feeding a block) stands for every middle block of the full stack,
    while the first and last keep their own neighbours. When the shortened model does not trace (its forward
    needs every block), the full model is traced.
    """
    batch = sample_batch_size or spec.global_batch_size
    stack = _identical_stack(spec.model)
    if stack is not None:
        parent, name, container = stack
        setattr(parent, name, type(container)(list(container.children())[:3]))
        try:
            captured = capture_training_step(spec, batch)
            short = model_graph_from_capture(spec.model, captured, batch)
        except Exception:
            short = None
        finally:
            setattr(parent, name, container)
        if short is not None:
            return _deepen(spec.model, short, container)
    captured = capture_training_step(spec, batch)
    return model_graph_from_capture(spec.model, captured, batch)


def _identical_stack(model: nn.Module) -> tuple[nn.Module, str, nn.Module] | None:
    """(parent, attribute, container) of the repeated stack when it has >= 4 structurally identical blocks."""
    path = repeated_stack_path(model)
    if not path:
        return None
    container = model.get_submodule(path)
    blocks = list(container.children())
    if len(blocks) < 4 or len(blocks) != len(container):
        return None

    def signature(block: nn.Module) -> list:
        return [type(block)] + [(n, tuple(p.shape), p.dtype) for n, p in block.named_parameters()] + [
            (n, type(m)) for n, m in block.named_modules()]

    first = signature(blocks[0])
    if any(signature(b) != first for b in blocks[1:]):
        return None
    parent_path, _, name = path.rpartition(".")
    return model.get_submodule(parent_path) if parent_path else model, name, container


def _deepen(model: nn.Module, short: ModelGraph, container: nn.Module) -> ModelGraph:
    """The full model's graph from one traced with three blocks: the middle block's facts stand for blocks
    1 .. N-2, and the third traced block becomes block N-1."""
    prefix = next(p for p, m in model.named_modules() if m is container)
    names = [n for n, _ in container.named_children()]
    middle, last = f"{prefix}.{names[1]}", f"{prefix}.{names[2]}"
    layers = []
    for layer in short.layers:
        if layer.path == middle:
            layers.extend(dataclasses.replace(layer, path=f"{prefix}.{n}") for n in names[1:-1])
        elif layer.path == last:
            layers.append(dataclasses.replace(layer, path=f"{prefix}.{names[-1]}"))
        else:
            layers.append(layer)
    digest = hashlib.sha256(short.fingerprint.encode())
    for name, p in model.named_parameters():
        digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}\n".encode())
    return ModelGraph(graph=short.graph, layers=layers, sample_batch_size=short.sample_batch_size,
                      fingerprint="sha256:" + digest.hexdigest()[:16],
                      num_params=sum(p.numel() for p in model.parameters()))


def model_graph_from_capture(model: nn.Module, captured: CapturedStep, sample_batch_size: int) -> ModelGraph:
    fx_graph = captured.graph_module.graph
    nodes = list(fx_graph.nodes)
    graph = nx.DiGraph()
    for node in nodes:
        graph.add_node(node.name)
        for inp in node.all_input_nodes:
            graph.add_edge(inp.name, node.name)

    first_use: dict[str, int] = {}
    for index, node in enumerate(nodes):
        if captured.phase[node.name] == "forward" and node.op == "call_function":
            first_use.setdefault(captured.module_path[node.name], index)
    chain = find_layer_chain(model, first_use)
    layer_of_node = _assign_layers(nodes, captured, chain)

    params = dict(model.named_parameters())
    position = {node.name: i for i, node in enumerate(nodes)}
    param_storages = set()
    param_layer: dict[str, str] = {}
    for node in nodes:
        if node.name in captured.param_names:
            param_storages.add(_storage_key(node.meta["val"]))
            users = [u for u in node.users if captured.phase[u.name] == "forward"]
            first = min(users, key=lambda u: position[u.name]) if users else None
            param_layer[captured.param_names[node.name]] = layer_of_node[first.name] if first else chain[0]

    linear_outputs, linear_inputs = _find_linears(model, nodes, captured)
    facts = {path: LayerFacts(path=path, kind="", num_params=0, param_bytes=0) for path in chain}
    for name, layer in param_layer.items():
        p = params[name]
        facts[layer].num_params += p.numel()
        facts[layer].param_bytes += p.numel() * p.element_size()

    tied = _tied_parameter_names(model)
    tp_region: dict[str, bool] = {}
    node_by_name = {node.name: node for node in nodes}
    for path in chain:
        layer_nodes = {n for n, lay in layer_of_node.items() if lay == path and captured.phase[n] == "forward"}
        units = find_tensor_parallel_units(graph, path, layer_nodes, linear_outputs, linear_inputs)
        units = [u for u in units if _unit_is_shardable(graph, path, u, linear_outputs, linear_inputs,
                                                         captured.param_names, tied)]
        facts[path].tp_units = units
        for index, unit in enumerate(units):
            _mark_tp_region(graph, path, index, unit, layer_nodes, linear_outputs, linear_inputs, captured.module_path,
                            node_by_name, params, tp_region, facts[path], captured.param_names, sample_batch_size)
        if not units:
            mark_vocab_parallel(model, graph, facts[path], layer_nodes, node_by_name, linear_outputs,
                                captured.module_path, captured.phase, tp_region)

    # a backward op is sharded when the forward op it differentiates is
    sharded_seq_nrs = {node_by_name[n].meta.get("seq_nr") for n in tp_region}
    for name, seq_nr in captured.grad_of_seq_nr.items():
        if seq_nr >= 0 and seq_nr in sharded_seq_nrs:
            tp_region[name] = True
    seen_storages = set(param_storages)
    backward_users = {n.name for n in nodes if captured.phase[n.name] == "backward"}
    counted_inputs: set[tuple[str, str]] = set()
    made_by_matmul = _storages_made_by_matmuls(nodes)
    for node in nodes:
        layer = facts[layer_of_node[node.name]]
        val = node.meta.get("val")
        phase = captured.phase[node.name]
        in_tp = tp_region.get(node.name, False)
        flops = _node_flops(node) if node.op == "call_function" else 0.0
        is_mm = _is_matmul(node)
        moved = 0.0
        if node.op == "call_function" and not is_mm and not _is_view(node):
            moved = float(_nbytes(val) + sum(_nbytes(i.meta.get("val")) for i in node.all_input_nodes))
        saved = matmul_saved = 0
        if phase == "forward" and node.op == "call_function":
            _count_layer_inputs(node, layer_of_node, captured.param_names, layer, counted_inputs)
        if phase == "forward" and node.name not in captured.param_names and any(
                u.name in backward_users for u in node.users):
            for t in _tensors(val):
                key = _storage_key(t)
                if key not in seen_storages:
                    seen_storages.add(key)
                    saved += t.untyped_storage().nbytes()
                    matmul_saved += t.untyped_storage().nbytes() if key in made_by_matmul else 0
        graph.nodes[node.name].update(
            module_path=captured.module_path[node.name], layer=layer.path, phase=phase,
            output_shapes=[tuple(t.shape) for t in _tensors(val)], flops=flops, bytes_accessed=moved,
            saved_bytes=saved, tensor_parallel=in_tp)
        if isinstance(node.target, torch._ops.OpOverload):
            layer.ops.append(OpFacts(phase=phase, flops=flops, bytes_accessed=moved, is_matmul=is_mm,
                                     tensor_parallel=in_tp,
                                     activation_bytes=_activation_bytes(node, param_storages) if is_mm else 0.0))
        if phase == "forward":
            layer.fwd_flops += flops
            layer.fwd_bytes += moved
            layer.saved_bytes += saved
            layer.matmul_saved_bytes += matmul_saved
            if is_mm:
                layer.fwd_matmul_flops += flops
            if in_tp:
                layer.tp_fwd_flops += flops
                layer.tp_fwd_bytes += moved
                layer.tp_saved_bytes += saved
                layer.tp_matmul_saved_bytes += matmul_saved
        else:
            layer.bwd_flops += flops
            layer.bwd_bytes += moved
            if in_tp:
                layer.tp_bwd_flops += flops
                layer.tp_bwd_bytes += moved

    _assign_kinds(model, nodes, layer_of_node, captured, facts)
    fingerprint = _fingerprint(nodes, captured)
    num_params = sum(p.numel() for p in params.values())
    return ModelGraph(graph=graph, layers=[facts[p] for p in chain], sample_batch_size=sample_batch_size,
                      fingerprint=fingerprint, num_params=num_params)


def _is_matmul(node: torch.fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and node.target.overloadpacket.__name__ in _MATMUL_OPS


def _storages_made_by_matmuls(nodes: list[torch.fx.Node]) -> set:
    """Storage keys first written by a matmul-class op (views of them share the key)."""
    producer_is_matmul: dict = {}
    for node in nodes:
        if node.op == "call_function" and not _is_view(node):
            for t in _tensors(node.meta.get("val")):
                producer_is_matmul.setdefault(_storage_key(t), _is_matmul(node))
    return {key for key, is_mm in producer_is_matmul.items() if is_mm}


def _count_layer_inputs(node: torch.fx.Node, layer_of_node: dict[str, str], param_names: dict[str, str],
                        layer: LayerFacts, counted: set[tuple[str, str]]) -> None:
    """Add to layer.input_bytes each non-parameter value `node` reads that another layer (or the batch) made."""
    for inp in node.all_input_nodes:
        if inp.name in param_names or layer_of_node.get(inp.name) == layer.path and inp.op != "placeholder":
            continue
        if (layer.path, inp.name) not in counted:
            counted.add((layer.path, inp.name))
            layer.input_bytes += _nbytes(inp.meta.get("val"))


def _assign_layers(nodes: list[torch.fx.Node], captured: CapturedStep, chain: list[str]) -> dict[str, str]:
    """Each node's layer: the chain layer containing its module, else the nearest labelled node before it."""
    def owner(path: str) -> str | None:
        for layer in chain:
            if layer == "" or path == layer or path.startswith(layer + "."):
                return layer
        return None

    layer_of: dict[str, str] = {}
    pending: list[str] = []
    last: str | None = None
    for node in nodes:
        if node.op in ("placeholder", "output"):
            pending.append(node.name)
            continue
        layer = owner(captured.module_path[node.name])
        if layer is None:
            layer = last
        if layer is None:
            pending.append(node.name)
            continue
        for name in pending:
            layer_of[name] = layer
        pending = []
        layer_of[node.name] = layer
        last = layer
    for name in pending:
        layer_of[name] = last if last is not None else chain[0]
    return layer_of


def _find_linears(model: nn.Module, nodes, captured: CapturedStep) -> tuple[dict[str, str], dict[str, str]]:
    """For each nn.Linear (or transformers Conv1D) used in forward: the node producing its output and the node
    that is its input."""
    linear_paths = {name for name, m in model.named_modules() if is_linear_like(m)}
    outputs: dict[str, str] = {}
    inputs: dict[str, str] = {}
    for node in nodes:
        if captured.phase[node.name] != "forward" or node.op != "call_function":
            continue
        path = captured.module_path[node.name]
        if path not in linear_paths:
            continue
        if path not in inputs:
            # first op of the linear reads its input (a view/t of the activation or the weight)
            for arg in node.all_input_nodes:
                if arg.name not in captured.param_names and captured.module_path.get(arg.name) != path:
                    inputs[path] = arg.name
                    break
        last_users = [u for u in node.users if captured.module_path.get(u.name) != path]
        if last_users:
            outputs[node.name] = path
    return outputs, inputs


def _tied_parameter_names(model: nn.Module) -> set[str]:
    """Every name of a parameter reachable under more than one name (a head tied to the embedding)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {name for group in names.values() if len(group) > 1 for name in group}


def _unit_is_shardable(graph: nx.DiGraph, layer_path: str, unit: TensorParallelUnit, linear_outputs: dict[str, str],
                       linear_inputs: dict[str, str], param_names: dict[str, str], tied: set[str]) -> bool:
    """False for a unit the runtime cannot shard exactly:
    - a parameter between its column and row linears (BERT's MLM head: dense -> LayerNorm -> decoder): the
      LayerNorm normalises over the features the column split shards, and its parameters are not sharded;
    - a linear whose weight is tied to another module (BERT's decoder is the word embedding): sharding it would
      shard the embedding too.
    """
    def full(rel: str) -> str:
        return f"{layer_path}.{rel}" if layer_path else rel

    unit_paths = {full(c) for c in unit.colwise} | {full(unit.rowwise)}
    if any(name.rpartition(".")[0] in unit_paths for name in tied):
        return False
    row_input = linear_inputs.get(full(unit.rowwise))
    if row_input is None:
        return False
    between = nx.ancestors(graph, row_input) | {row_input}
    col_outputs = [n for n, path in linear_outputs.items() if path in unit_paths - {full(unit.rowwise)}]
    region = set().union(*(nx.descendants(graph, n) | {n} for n in col_outputs)) & between
    for node in region:
        for pred in graph.predecessors(node):
            name = param_names.get(pred)
            if name is not None and name.rpartition(".")[0] not in unit_paths:
                return False
    return True


def _mark_tp_region(graph: nx.DiGraph, layer_path: str, unit_index: int, unit: TensorParallelUnit,
                    layer_nodes: set[str],
                    linear_outputs: dict[str, str], linear_inputs: dict[str, str], module_path: dict[str, str],
                    node_by_name: dict[str, torch.fx.Node], params: dict[str, nn.Parameter],
                    tp_region: dict[str, bool], fact: LayerFacts, param_names: dict[str, str],
                    sample_batch_size: int) -> None:
    """Mark forward nodes from the unit's column linears to its row linear (inclusive) as sharded by tp.

    The region is every forward node of the layer downstream of a column linear's output and not downstream
    of the row linear's output: the path into the row linear, and the side branches that only backward reads
    (dropout masks, the `detach` aliases autograd saves for softmax), which hold per-head data too. Inside a
    column linear only the nodes computed from its (sharded) weight and bias count: the view of its input
    that the matmul reads is the whole, replicated activation on every tp rank.
    """
    def full(rel: str) -> str:
        return f"{layer_path}.{rel}" if layer_path else rel

    col_paths = {full(c) for c in unit.colwise}
    row_path = full(unit.rowwise)
    after_row: set[str] = set()
    for out_node, path in linear_outputs.items():
        if path == row_path:
            after_row |= nx.descendants(graph, out_node)
    col_param_nodes = [n for n, name in param_names.items() if name.rpartition(".")[0] in col_paths]
    from_col_params = set().union(*(nx.descendants(graph, n) for n in col_param_nodes)) if col_param_nodes else set()
    region = {n for n in layer_nodes if module_path[n] == row_path
              or (module_path[n] in col_paths and n in from_col_params)}
    for out_node, path in linear_outputs.items():
        if path in col_paths:
            region |= (nx.descendants(graph, out_node) & layer_nodes) - after_row
    for node in region:
        tp_region[node] = True
    for path in col_paths | {row_path}:
        for name, p in params.items():
            # the row linear's bias is added after the all-reduce, so it stays replicated
            if name.startswith(path + ".") and not (path == row_path and name.endswith("bias")):
                fact.tp_num_params += p.numel()
    fact.tp_allreduce_bytes += sum(_nbytes(node_by_name[n].meta.get("val"))
                                   for n, p in linear_outputs.items() if p == row_path)
    for rel in (*unit.colwise, unit.rowwise):
        fact.tp_linears.append(_unit_linear_facts(rel, full(rel), rel == unit.rowwise, linear_outputs, linear_inputs,
                                                  node_by_name, params, sample_batch_size, unit_index))


def _unit_linear_facts(rel: str, path: str, rowwise: bool, linear_outputs: dict[str, str],
                       linear_inputs: dict[str, str], node_by_name: dict[str, torch.fx.Node],
                       params: dict[str, nn.Parameter], sample_batch_size: int, unit: int) -> UnitLinearFacts:
    weight = params[f"{path}.weight"]
    # nn.Linear keeps weight [out, in]; transformers Conv1D keeps [in, out] and has `nf` output features
    in_features, out_features = weight.shape[1], weight.shape[0]
    outputs = [node_by_name[n].meta.get("val") for n, p in linear_outputs.items() if p == path]
    output_bytes = sum(_nbytes(v) for v in outputs)
    if outputs and _tensors(outputs[0]) and _tensors(outputs[0])[0].shape[-1] != out_features:
        in_features, out_features = out_features, in_features
    value = node_by_name[linear_inputs[path]].meta.get("val")
    tensors = _tensors(value)
    batch = tensors[0].shape[0] if tensors and tensors[0].dim() > 1 else 0
    return UnitLinearFacts(path=rel, rowwise=rowwise, in_features=int(in_features), out_features=int(out_features),
                           has_bias=f"{path}.bias" in params, input_bytes=_nbytes(value), output_bytes=output_bytes,
                           batch_first=bool(batch) and batch == sample_batch_size, unit=unit,
                           input_node=linear_inputs[path])


def _assign_kinds(model, nodes, layer_of_node, captured, facts) -> None:
    signatures: dict[str, list[str]] = {path: [] for path in facts}
    for path in facts:
        if path:
            module = model.get_submodule(path)
            signatures[path].append(type(module).__name__)
            signatures[path].extend(f"{n}:{tuple(p.shape)}:{p.dtype}" for n, p in module.named_parameters())
    for node in nodes:
        if captured.phase[node.name] == "forward" and node.op == "call_function":
            shapes = [tuple(t.shape) for t in _tensors(node.meta.get("val"))]
            signatures[layer_of_node[node.name]].append(f"{node.target}{shapes}")
    for path, sig in signatures.items():
        facts[path].kind = hashlib.sha256("\n".join(sig).encode()).hexdigest()[:10]


def _fingerprint(nodes, captured: CapturedStep) -> str:
    """sha256 over every forward op, its module path and output shapes, and parameter names and shapes."""
    digest = hashlib.sha256()
    for node in nodes:
        if captured.phase[node.name] != "forward":
            continue
        shapes = [(tuple(t.shape), str(t.dtype)) for t in _tensors(node.meta.get("val"))]
        label = captured.param_names.get(node.name, "")
        digest.update(f"{node.op}|{node.target}|{captured.module_path[node.name]}|{label}|{shapes}\n".encode())
    return "sha256:" + digest.hexdigest()[:16]
