"""Capture one training step (forward, loss, backward) as an aten-level fx graph on fake tensors.

Why make_fx of the joint step: `torch.fx.symbolic_trace` fails on real Hugging Face models and sees only the
forward; `make_fx(tracing_mode="fake")` traces GPT-2, Llama, BERT, ViT and ResNet, runs on FakeTensors (no
weight is allocated, meta-device models work), and tracing `torch.autograd.grad` inside the step records the
backward too, so what autograd saves for backward is visible as forward values used by backward nodes.

Every node is tied to the module that ran it: global module hooks mark which module is on top of the call
stack while the tracer appends nodes, and backward nodes inherit the module of the forward op they
differentiate through the autograd sequence number (`seq_nr`) that `preserve_node_meta` records.
"""

from __future__ import annotations

import re
import traceback
from dataclasses import dataclass

import torch
import torch.fx.traceback as fx_traceback
from torch import nn
from torch.func import functional_call
from torch.fx.experimental.proxy_tensor import get_proxy_mode, make_fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from planner.model_spec import ModelSpec


class CaptureError(RuntimeError):
    """The model could not be traced; the message names the failing op or source line and what to try."""


@dataclass
class CapturedStep:
    """A traced training step.

    graph_module: aten-level graph of `loss, grads = step(params, buffers, inputs, targets)`.
    module_path: fx node name -> dotted path of the module that produced it ("" for the root).
    phase: fx node name -> "forward" or "backward".
    grad_of_seq_nr: backward fx node name -> autograd sequence number of the forward op it differentiates
        (forward nodes carry theirs as node.meta["seq_nr"]).
    param_names: placeholder node name -> parameter name, for parameter placeholders.
    """

    graph_module: torch.fx.GraphModule
    module_path: dict[str, str]
    phase: dict[str, str]
    param_names: dict[str, str]
    grad_of_seq_nr: dict[str, int]


class _ModuleAttributor:
    """Labels each new fx node with the module on top of the call stack when the tracer created it."""

    def __init__(self, model: nn.Module):
        self.path_of = {id(m): name for name, m in model.named_modules()}
        self.stack: list[str] = [""]
        self.labels: dict[torch.fx.Node, str] = {}
        self.phase_start: dict[torch.fx.Node, str] = {}
        self.phase = "forward"
        self.seq_nr = -1
        self.grad_of_seq_nr: dict[torch.fx.Node, int] = {}

    def flush(self) -> None:
        """Assign every node created since the last flush to the current top of the module stack."""
        mode = get_proxy_mode()
        if mode is None:
            return
        for node in reversed(mode.tracer.graph.nodes):
            if node in self.labels:
                break
            self.labels[node] = self.stack[-1]
            self.phase_start[node] = self.phase
            if self.phase == "backward":
                self.grad_of_seq_nr[node] = self.seq_nr

    def start_backward(self, loss: torch.Tensor) -> None:
        """Label backward nodes with the module of the forward op they differentiate.

        Each autograd node gets a pre-hook that, when the engine is about to run it, flushes the nodes of the
        previous autograd node and makes this node's forward module the current label.
        """
        self.phase = "backward"
        self.stack = [""]
        path_by_seq_nr = {}
        for node, path in self.labels.items():
            seq_nr = node.meta.get("seq_nr", -1)
            if seq_nr is not None and seq_nr >= 0:
                path_by_seq_nr.setdefault(seq_nr, path)
        seen = set()
        pending = [loss.grad_fn] if loss.grad_fn is not None else []
        while pending:
            grad_fn = pending.pop()
            if grad_fn is None or grad_fn in seen:
                continue
            seen.add(grad_fn)
            seq_nr = grad_fn._sequence_nr()
            grad_fn.register_prehook(self._backward_prehook(path_by_seq_nr.get(seq_nr, ""), seq_nr))
            pending.extend(next_fn for next_fn, _ in grad_fn.next_functions)

    def _backward_prehook(self, path: str, seq_nr: int):
        def hook(grad_outputs):
            self.flush()
            self.stack = [path]
            self.seq_nr = seq_nr

        return hook

    def pre_hook(self, module: nn.Module, args) -> None:
        self.flush()
        self.stack.append(self.path_of.get(id(module), self.stack[-1]))

    def post_hook(self, module: nn.Module, args, output) -> None:
        self.flush()
        if len(self.stack) > 1:
            self.stack.pop()


def _first_user_frame(err: BaseException) -> str:
    """The innermost stack frame outside torch, so a trace failure points at the user's line."""
    frames = traceback.extract_tb(err.__traceback__)
    for frame in reversed(frames):
        if "/torch/" not in frame.filename and "/planner/capture.py" not in frame.filename:
            return f"{frame.filename}:{frame.lineno}: {frame.line}"
    return "unknown location"


_OP_PATTERN = re.compile(r"\b(aten\.[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?|[A-Za-z0-9_]+::[A-Za-z0-9_.]+)")


_DTYPE_RULE = re.compile(r"Expected (inputs|mat_a|mat_b|.*) (of|to be) .*(BF16|Float|Half|bfloat16|float)", re.I)


def _fake_dtype_rule(text: str) -> bool:
    """A fake kernel's dtype check failed (`Expected inputs of BF16 type but got mat_a.dtype=torch.float32`)."""
    return "dtype" in text and bool(_DTYPE_RULE.search(text))


def _kernel_of(err: BaseException) -> str:
    """The aten op whose meta kernel raised, from the traceback's `meta_<op>` frame (`meta_grouped_mm`)."""
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        if frame.name.startswith("meta_"):
            return f"aten._{frame.name.removeprefix('meta_')} (its fake kernel {frame.name})"
    return f"unknown ({type(err).__name__})"


def describe_trace_failure(err: BaseException, attributor: _ModuleAttributor, model: nn.Module) -> str:
    """The CaptureError message: the op that failed, the user's source line, the module running, and the fix."""
    text = str(err).splitlines()[0] if str(err) else ""
    path = attributor.stack[-1] if attributor.stack else ""
    try:
        module_type = type(model.get_submodule(path)).__name__ if path else type(model).__name__
    except AttributeError:
        module_type = "?"
    data_dependent = isinstance(err, GuardOnDataDependentSymNode) or "data-dependent" in text \
        or "data dependent" in text
    if data_dependent:
        op = "aten._local_scalar_dense (reading a tensor's value: `.item()`, `bool(t)`, `int(t)`, `if t ...:`)"
        fix = ("compute without reading values: `torch.where` / masks instead of `if`, sizes from shapes instead of "
               "`.item()`, or `torch.cond` for a real branch")
    elif _fake_dtype_rule(text):
        found = _OP_PATTERN.search(text)
        op = found.group(1) if found else _kernel_of(err)
        fix = ("the op's fake (meta) kernel refuses these dtypes although it has one (its dtype rule is a GPU "
               "kernel's: `grouped_mm` wants bfloat16 on fake tensors and takes float32 on CPU); compute in a "
               "dtype the fake kernel accepts or use another implementation. transformers mixture-of-experts "
               "models: set `config._experts_implementation = \"batched_mm\"` (dense experts as batched "
               "matmuls; \"eager\" loops over experts with data-dependent sizes and does not trace)")
    else:
        found = _OP_PATTERN.search(text)
        op = found.group(1) if found else f"unknown ({type(err).__name__})"
        fix = ("an op without a fake (meta) kernel needs one: `torch.library.register_fake`, or wrap the code in a "
               "custom op that has one")
    return (f"tracing the training step failed\n"
            f"  op: {op}\n"
            f"  at: {_first_user_frame(err)}\n"
            f"  in module: {path or '<root>'} ({module_type})\n"
            f"  error: {type(err).__name__}: {text}\n"
            f"  what to do: meshplan traces forward and backward with make_fx on fake tensors (no real values); "
            f"{fix}. Hugging Face models: call them with `use_cache=False` (no KV cache while training) and set "
            f"`config._attn_implementation = \"eager\"` or \"sdpa\" (custom attention kernels do not trace).")


def call_make_batch(spec: ModelSpec, batch_size: int) -> tuple[tuple, torch.Tensor]:
    """`spec.make_batch(batch_size, 0)`, checked to be `(inputs, targets)`: a tuple of inputs and a tensor."""
    call = f"make_batch({batch_size}, 0)"
    form = "make_batch must return (inputs, targets): a tuple of the model's positional inputs and a tensor"
    try:
        batch = spec.make_batch(batch_size, 0)
    except Exception as err:
        raise CaptureError(f"{call} raised {type(err).__name__}: {str(err)[:300]}; fix the MODEL's make_batch "
                           f"({form})") from err
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise CaptureError(f"{call} returned {type(batch).__name__}"
                           f"{f' of {len(batch)} items' if isinstance(batch, (tuple, list)) else ''}; {form}")
    inputs, targets = batch
    if not isinstance(inputs, (tuple, list)):
        raise CaptureError(f"{call} returned inputs of type {type(inputs).__name__}; {form} (wrap a single "
                           "input as `(x,)`)")
    if not isinstance(targets, torch.Tensor):
        raise CaptureError(f"{call} returned targets of type {type(targets).__name__}; {form}")
    return tuple(inputs), targets


def capture_training_step(spec: ModelSpec, batch_size: int) -> CapturedStep:
    """Trace forward + loss + backward of `spec.model` on a batch of `batch_size` samples, on fake tensors."""
    model = spec.model
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    if not params:
        raise CaptureError("the model has no parameters: there is nothing to train or shard")
    inputs, targets = call_make_batch(spec, batch_size)
    device = next(iter(params.values())).device
    inputs = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs)
    targets = targets.to(device)
    attributor = _ModuleAttributor(model)

    def step(params, buffers, inputs, targets):
        output = functional_call(model, {**params, **buffers}, tuple(inputs))
        loss = spec.loss_fn(output, targets)
        attributor.flush()
        attributor.start_backward(loss)
        grads = torch.autograd.grad(loss, list(params.values()))
        attributor.flush()
        return loss, grads

    pre = nn.modules.module.register_module_forward_pre_hook(attributor.pre_hook)
    post = nn.modules.module.register_module_forward_hook(attributor.post_hook)
    try:
        with fx_traceback.preserve_node_meta():
            gm = make_fx(step, tracing_mode="fake", _allow_non_fake_inputs=True)(params, buffers, inputs, targets)
    except Exception as err:
        raise CaptureError(describe_trace_failure(err, attributor, model)) from err
    finally:
        pre.remove()
        post.remove()
    return _label_nodes(gm, attributor, list(params))


def _label_nodes(gm: torch.fx.GraphModule, attributor: _ModuleAttributor, param_names: list[str]) -> CapturedStep:
    """Move the labels from the tracer's nodes to the returned graph's nodes (same names)."""
    module_path = {node.name: path for node, path in attributor.labels.items()}
    phase = {node.name: p for node, p in attributor.phase_start.items()}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in gm.graph.nodes:
        module_path.setdefault(node.name, "")
        phase.setdefault(node.name, "forward" if node.op == "placeholder" else "backward")
    param_placeholder = {n.name: name for n, name in zip(placeholders, param_names, strict=False)}
    grad_of_seq_nr = {node.name: seq for node, seq in attributor.grad_of_seq_nr.items()}
    return CapturedStep(graph_module=gm, module_path=module_path, phase=phase, param_names=param_placeholder,
                        grad_of_seq_nr=grad_of_seq_nr)
