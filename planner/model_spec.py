"""ModelSpec: the one structure that tells meshplan what to train, and how to load it from `file.py:function`.

A MODEL argument on the command line is `path/to/file.py:function`; the function takes no arguments and returns
a `ModelSpec` (or `hf:PATH?...`, a Hugging Face config built by planner/hf_source.py). The planner calls it
under `torch.device("meta")` so no weight is ever allocated while planning; the runtime calls it on the real
device after seeding the random generator, so every rank builds the same initial weights.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]


class ModelSpecError(ValueError):
    """A MODEL reference that cannot be loaded, or a function that does not return a valid ModelSpec."""


@dataclass
class ModelSpec:
    """A model, its data and its loss: everything `plan` and `execute` need to know about the training job."""

    model: nn.Module
    """The module to train. May live on the meta device while planning."""
    make_batch: Callable[[int, int], Batch]
    """`make_batch(batch_size, step) -> (inputs, targets)`: a deterministic global batch for `step`.
    Every rank calls it with the same arguments and keeps its own data-parallel slice of dimension 0."""
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor]
    """`loss_fn(model(*inputs), targets) -> scalar`, a mean over the batch (so data-parallel averaging is exact)."""
    global_batch_size: int
    """Samples per optimizer step, summed over all data-parallel ranks."""
    learning_rate: float = 1e-3
    """AdamW learning rate used by `execute`."""

    def validate(self, source: str) -> None:
        """Raise ModelSpecError naming the bad field; called on every spec a MODEL function returns."""
        if not isinstance(self.model, nn.Module):
            raise ModelSpecError(f"{source}: ModelSpec.model must be an nn.Module, got {type(self.model).__name__}")
        if not callable(self.make_batch) or not callable(self.loss_fn):
            raise ModelSpecError(f"{source}: ModelSpec.make_batch and ModelSpec.loss_fn must be callables")
        if isinstance(self.global_batch_size, bool) or not isinstance(self.global_batch_size, int) \
                or self.global_batch_size < 1:
            raise ModelSpecError(
                f"{source}: ModelSpec.global_batch_size must be a positive integer, got {self.global_batch_size!r}"
            )
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise ModelSpecError(f"{source}: ModelSpec.learning_rate must be > 0, got {self.learning_rate!r}")


def resolve_model_source(source: str, base_dir: Path | None = None) -> tuple[Path, str]:
    """Split `path/to/file.py:function` into an existing file and a function name.

    A relative path is looked up in the current directory first, then in `base_dir` (the folder of the plan
    that names it), so a plan keeps working when it is moved next to its model file.
    """
    path_text, sep, func_name = source.rpartition(":")
    if not sep or not path_text or not func_name:
        raise ModelSpecError(f"MODEL {source!r} must look like path/to/file.py:function")
    candidates = [Path(path_text)]
    if base_dir is not None and not Path(path_text).is_absolute():
        candidates.append(base_dir / path_text)
    for path in candidates:
        if path.is_file():
            return path.resolve(), func_name
    raise ModelSpecError(f"MODEL {source!r}: file {path_text!r} not found (looked in {[str(c) for c in candidates]})")


def load_model_spec(source: str, base_dir: Path | None = None, device: str | torch.device | None = None) -> ModelSpec:
    """Import `file.py`, call `function()` (under `torch.device(device)` when given) and validate its ModelSpec.

    An `hf:PATH?...` source (planner/hf_source.py) builds a Hugging Face model from its config instead."""
    if source.startswith("hf:"):
        from planner.hf_source import load_hf_spec

        if device is None:
            result = load_hf_spec(source, base_dir)
        else:
            with torch.device(device):
                result = load_hf_spec(source, base_dir)
        result.validate(f"MODEL {source!r}")
        return result
    path, func_name = resolve_model_source(source, base_dir)
    module_name = f"_meshplan_model_{abs(hash(str(path)))}"
    module = sys.modules.get(module_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ModelSpecError(f"MODEL {source!r}: cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[module_name]
            raise ModelSpecError(f"MODEL {source!r}: importing {path} failed: {type(err).__name__}: {err}") from err
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ModelSpecError(f"MODEL {source!r}: {path.name} has no function {func_name!r}")
    try:
        if device is None:
            result = func()
        else:
            with torch.device(device):
                result = func()
    except Exception as err:
        raise ModelSpecError(f"MODEL {source!r}: {func_name}() raised {type(err).__name__}: {err}") from err
    if not isinstance(result, ModelSpec):
        raise ModelSpecError(
            f"MODEL {source!r}: {func_name}() must return planner.ModelSpec, got {type(result).__name__}"
        )
    result.validate(f"MODEL {source!r}")
    return result
