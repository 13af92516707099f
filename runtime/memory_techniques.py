"""Per-layer activation memory techniques: checkpointing (full or selective) and activation offload to the host.

Applied after tensor parallelism and before data parallelism (as torchtitan does), through forward hooks that
keep module names unchanged, so plans, state dicts and parity checks keep their parameter paths:

- `full`: the composable `torch.distributed._composable.checkpoint` (non-reentrant `torch.utils.checkpoint`
  as module hooks): the layer keeps only its inputs and runs its forward again in backward.
- `selective`: the same with a `create_selective_checkpoint_contexts` policy (torchtitan's op-level SAC):
  outputs of matmuls and attention kernels (`SAVED_OPS`) are saved, every other op (norms, activations,
  element-wise, views) is recomputed in backward. Cheap ops are recomputed, expensive ones are not.
- `offload_activations`: `torch.autograd.graph.save_on_cpu` is active during the layer's forward, so every
  tensor autograd saves there waits on the host until backward (`pin_memory` only on CUDA). With checkpointing
  on the same layer, `save_on_cpu` is entered first (outside the checkpoint), so what checkpointing keeps goes
  to the host: `full` saves the layer inputs through autograd (`_NoopSaveInputs`), which are offloaded;
  `selective` also keeps matmul outputs in its own cache, which stay on the device. The recomputation in
  backward calls the layer again; the offload hook stays out of it (it would capture the recomputed tensors).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from planner.plan import Plan
from runtime.parallelize import forward_context

_aten = torch.ops.aten
SAVED_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten.baddbmm.default,
    _aten.linear.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
}
"""Ops whose outputs selective checkpointing saves (matmuls and fused attention); all others are recomputed."""


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


@contextlib.contextmanager
def _recompute_context(plan: Plan, inner: contextlib.AbstractContextManager):
    with forward_context(plan), inner:
        yield


def _checkpoint_contexts(plan: Plan, selective: bool):
    """(forward context, recompute context) for one checkpointed forward.

    The recomputation in backward runs outside the training loop's `forward_context` (math SDPA, implicit
    replication for tensor-parallel layers), so it is entered again around the recomputation.
    """
    if not selective:
        return contextlib.nullcontext(), _recompute_context(plan, contextlib.nullcontext())
    forward_ctx, recompute_ctx = create_selective_checkpoint_contexts(_selective_policy)
    return forward_ctx, _recompute_context(plan, recompute_ctx)


def apply_activation_checkpointing(model: nn.Module, plan: Plan) -> None:
    """Checkpoint every layer whose plan says `full` or `selective` (module hooks; names are unchanged)."""
    from torch.distributed._composable import checkpoint

    for layer in plan.layers:
        if layer.checkpoint == "none":
            continue
        module = model.get_submodule(layer.path) if layer.path else model
        contexts = functools.partial(_checkpoint_contexts, plan, layer.checkpoint == "selective")
        checkpoint(module, context_fn=contexts, preserve_rng_state=False)


def apply_activation_offload(model: nn.Module, plan: Plan, device: torch.device) -> None:
    """Run the forward of every `offload_activations` layer inside `save_on_cpu` (entered by a pre-hook).

    Call after `apply_activation_checkpointing`: the offload pre-hook is prepended, so it runs first."""
    for layer in plan.layers:
        if not layer.offload_activations:
            continue
        module = model.get_submodule(layer.path) if layer.path else model
        stack = contextlib.ExitStack()
        enter = functools.partial(_enter_save_on_cpu, stack, device.type == "cuda", layer.checkpoint != "none")
        module.register_forward_pre_hook(enter, prepend=True)
        module.register_forward_hook(functools.partial(_exit_save_on_cpu, stack), always_call=True)


def _enter_save_on_cpu(stack: contextlib.ExitStack, pin_memory: bool, checkpointed: bool, module, args) -> None:
    from torch.distributed._composable import checkpoint

    if checkpointed and not checkpoint.state(module).enable_hook:
        return  # the checkpoint's recomputation in backward (it disables its own hooks while it runs)
    stack.enter_context(torch.autograd.graph.save_on_cpu(pin_memory=pin_memory))


def _exit_save_on_cpu(stack: contextlib.ExitStack, module, args, output) -> None:
    stack.close()
