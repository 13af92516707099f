"""Build the model on the meta device and materialise only this rank's shard of every parameter.

No rank ever holds the full model: the MODEL function runs under `torch.device("meta")` (nothing allocated),
tensor and data parallelism shard the meta parameters, then `to_empty` allocates each rank's local shards and
`ParameterInit.materialize` fills them.

Why the weights are defined per parameter block (and not by `torch.manual_seed(seed)` + the constructor): the
constructor draws every parameter from one sequential random stream, so the value of any element depends on
every draw before it, and reproducing a shard would mean generating the whole model. Instead, while the
constructor runs on meta tensors, a dispatch mode records the in-place init ops applied to each parameter
(`uniform_(-b, b)` of nn.Linear's kaiming init, `normal_(0, 0.02)`, `fill_(1)` of a LayerNorm, ...: the
recipe, with the constructor's own shape-dependent bounds). A parameter's value is then defined as: split its
dim 0 into blocks of `BLOCK_ELEMENTS` elements (at least one row), and fill each block by replaying the recipe
with a generator seeded from (plan seed, parameter name, block index). Each element has the distribution the
model asked for; values depend on the seed and the parameter name only, not on the mesh, so every plan
(and the single-process reference, which calls the same code on an unsharded model) starts from the same
weights. A rank generates only the blocks that hold rows of its shard, one block at a time, and copies out its
rows and columns: the largest transient tensor is one block.

Which global indices a rank's shard holds comes from DTensor itself: for each tensor dim, `distribute_tensor`
of an `arange` with that dim's placements (`Shard`, FSDP2's `_StridedShard` over a tensor-parallel shard)
and `src_data_rank=None` (no communication) gives the local indices, and the shard is their product.

Blind spots: a recipe is replayable only when the parameter was made by a plain factory (`FACTORY_RECIPES`:
empty, zeros, ones, full, randn, rand) and every later init op writes the whole parameter, is element-wise and
takes scalar arguments (the ops in `REPLAYABLE_OPS`); a model whose init writes part of a parameter (an
Embedding's padding row), computes it (`torch.randn(n) * 0.02`), copies a tensor in (`orthogonal_`,
pretrained weights), ties a weight to two modules (`to_empty` would untie it) or that owns buffers
(computed in the constructor, e.g. rotary tables) gets `None` from `build_spec_on_meta`, and the runtime builds
it whole from the seed as before. Pipeline plans always do (stages are traced from a real model).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard
from torch.utils._python_dispatch import TorchDispatchMode

from planner.model_spec import ModelSpec, load_model_spec

BLOCK_ELEMENTS = 2**16
"""Elements per generated block (rounded to whole rows of dim 0): part of the weights' definition."""
RANDOM_OPS = {"uniform_", "normal_", "bernoulli_", "exponential_", "log_normal_", "cauchy_", "geometric_",
              "random_"}
REPLAYABLE_OPS = RANDOM_OPS | {"fill_", "zero_", "mul_", "add_", "sub_", "div_", "clamp_", "clamp_min_",
                               "clamp_max_", "erfinv_", "exp_", "log_", "sqrt_", "abs_", "neg_"}
"""Element-wise in-place ops an init may apply to a parameter (nn.init's uniform/normal/trunc_normal/constant)."""


@dataclass(frozen=True)
class InitOp:
    """One recorded in-place init op: `op(parameter, *args, **kwargs)`."""

    op: torch._ops.OpOverload
    args: tuple
    kwargs: dict


_aten = torch.ops.aten
FACTORY_RECIPES = {
    "empty": lambda args, kwargs: [],
    "empty_strided": lambda args, kwargs: [],
    "zeros": lambda args, kwargs: [InitOp(_aten.zero_.default, (), {})],
    "ones": lambda args, kwargs: [InitOp(_aten.fill_.Scalar, (1.0,), {})],
    "full": lambda args, kwargs: [InitOp(_aten.fill_.Scalar, (args[1],), {})],
    "randn": lambda args, kwargs: [InitOp(_aten.normal_.default, (0.0, 1.0), {})],
    "rand": lambda args, kwargs: [InitOp(_aten.uniform_.default, (0.0, 1.0), {})],
}
"""Factories a parameter may start from (`nn.Parameter(torch.ones(n))`), as the in-place ops that give the same
distribution; a tensor made any other way (arange, a computation, a copy of real data) cannot be replayed."""


class _InitRecorder(TorchDispatchMode):
    """Records, per tensor storage, the factory that made it and the in-place ops applied to it while the
    constructor runs on meta tensors."""

    def __init__(self):
        super().__init__()
        self.ops: dict[int, list[InitOp]] = {}
        self.unreplayable: set[int] = set()
        self.targets: dict[int, set] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func._schema.is_mutable and args and isinstance(args[0], torch.Tensor):
            target = args[0]
            key = target.untyped_storage()._cdata
            scalars = all(not isinstance(a, torch.Tensor) for a in args[1:]) and all(
                not isinstance(v, torch.Tensor) for k, v in kwargs.items() if k != "generator")
            if name in REPLAYABLE_OPS and scalars and target.storage_offset() == 0 and self.ops.get(key) is not None:
                self.ops[key].append(InitOp(func, tuple(args[1:]),
                                            {k: v for k, v in kwargs.items() if k != "generator"}))
                self.targets.setdefault(key, set()).add(tuple(target.shape))
            else:
                self.unreplayable.add(key)
        elif isinstance(out, torch.Tensor) and not any(ret.alias_info for ret in func._schema.returns):
            key = out.untyped_storage()._cdata
            self.ops[key] = FACTORY_RECIPES[name](args, kwargs) if name in FACTORY_RECIPES else None
            if self.ops[key] is None:
                self.unreplayable.add(key)
        return out

    def recipe(self, param: torch.Tensor) -> list[InitOp] | None:
        """The ops that initialised `param` in order, or None when they cannot be replayed block by block
        (made outside the recorder, by an op other than a known factory, or written in part)."""
        key = param.untyped_storage()._cdata
        if key not in self.ops or key in self.unreplayable:
            return None
        if self.targets.get(key, {tuple(param.shape)}) != {tuple(param.shape)}:
            return None
        return self.ops[key]


def _block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class ParameterInit:
    """Per-parameter init recipes of a model built on the meta device, and the seed that fixes the values."""

    recipes: dict[str, list[InitOp]]
    """Parameter name (as in `model.named_parameters()` before any wrapper) -> its init ops in order."""
    seed: int

    def materialize(self, model: nn.Module, device: torch.device) -> None:
        """Allocate `model`'s (sharded) meta parameters on `device` and fill this rank's shards."""
        model.to_empty(device=device)
        for name, param in model.named_parameters():
            self.fill(name, param)

    def fill(self, name: str, param: torch.Tensor) -> None:
        """Write this rank's shard of parameter `name` (a DTensor, or a plain tensor holding all of it)."""
        if name not in self.recipes:
            raise KeyError(f"parameter {name!r} was not recorded when the model was built on the meta device")
        local = param.to_local() if isinstance(param, DTensor) else param
        shape = tuple(param.shape)
        indices = local_indices(param)
        if tuple(len(i) for i in indices) != tuple(local.shape):
            raise RuntimeError(f"parameter {name}: local shard {tuple(local.shape)} does not match the indices DTensor "
                               f"gives for {shape} ({[len(i) for i in indices]})")
        if local.numel() == 0:
            return
        row_elements = max(1, int(torch.Size(shape[1:]).numel()))
        rows_per_block = max(1, BLOCK_ELEMENTS // row_elements)
        rows = indices[0] if shape else torch.zeros(1, dtype=torch.long)
        with torch.no_grad():
            for block in torch.unique(rows // rows_per_block).tolist():
                start = block * rows_per_block
                stop = min(start + rows_per_block, shape[0] if shape else 1)
                values = self._generate(name, block, (stop - start, *shape[1:]), param.dtype)
                positions = torch.nonzero((rows >= start) & (rows < stop)).flatten()
                picked = values[rows[positions] - start] if shape else values
                for dim, dim_indices in enumerate(indices[1:], start=1):
                    picked = picked.index_select(dim, dim_indices)
                if shape:
                    local[positions.to(local.device)] = picked.to(local.device)
                else:
                    local.copy_(picked.reshape(local.shape))

    def _generate(self, name: str, block: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """One block of parameter `name`: its recipe replayed on CPU with the block's own generator."""
        generator = torch.Generator().manual_seed(_block_seed(self.seed, name, block))
        values = torch.zeros(shape, dtype=dtype)
        for step in self.recipes[name]:
            kwargs = dict(step.kwargs)
            if step.op.overloadpacket.__name__ in RANDOM_OPS:
                kwargs["generator"] = generator
            step.op(values, *step.args, **kwargs)
        return values


def local_indices(param: torch.Tensor) -> list[torch.Tensor]:
    """For each dim of `param`, the global indices this rank's shard holds, in local order."""
    if not isinstance(param, DTensor):
        return [torch.arange(size) for size in param.shape]
    indices = []
    for dim, size in enumerate(param.shape):
        placements = []
        for placement in param.placements:
            if isinstance(placement, _StridedShard) and placement.dim == dim:
                placements.append(_StridedShard(0, split_factor=placement.split_factor))
            elif isinstance(placement, Shard) and not isinstance(placement, _StridedShard) and placement.dim == dim:
                placements.append(Shard(0))
            else:
                placements.append(Replicate())
        index = torch.arange(size, device=param.device_mesh.device_type)
        indices.append(distribute_tensor(index, param.device_mesh, placements, src_data_rank=None).to_local().cpu())
    return indices


def build_spec_on_meta(source: str, seed: int, base_dir: Path | None = None) -> tuple[ModelSpec, ParameterInit | None]:
    """The MODEL built on the meta device, with its parameters' init recipes; the init is None when some
    parameter's init cannot be replayed per block, or the model has buffers or tied weights (module docstring)."""
    recorder = _InitRecorder()
    with recorder:
        spec = load_model_spec(source, base_dir=base_dir, device="meta")
    recipes = {}
    for name, param in spec.model.named_parameters():
        recipe = recorder.recipe(param)
        if recipe is None:
            return spec, None
        recipes[name] = recipe
    if any(True for _ in spec.model.buffers()):
        return spec, None
    if len(list(spec.model.named_parameters(remove_duplicate=False))) != len(recipes):
        return spec, None  # tied weights: `to_empty` gives each module its own tensor (meta -> real is no set_data)
    return spec, ParameterInit(recipes, seed)


def build_reference(source: str, seed: int, base_dir: Path | None = None,
                    device: torch.device | str = "cpu") -> ModelSpec:
    """The whole model with the same initial weights as a sharded run of any plan with `seed` (world size 1's
    path), or, when the init cannot be replayed, built from `torch.manual_seed(seed)` as the runtime then is."""
    spec, init = build_spec_on_meta(source, seed, base_dir)
    if init is None:
        torch.manual_seed(seed)
        return load_model_spec(source, base_dir=base_dir, device=device)
    init.materialize(spec.model, torch.device(device))
    return spec
