"""ModelSpec: the one structure that tells meshplan what to train, and how to load it from `file.py:function`.

A MODEL argument on the command line is `path/to/file.py:function`; the function takes no arguments and returns
a `ModelSpec` (or `hf:PATH?...`, a Hugging Face config built by planner/hf_source.py). The planner calls it
under `torch.device("meta")` so no weight is ever allocated while planning; the runtime calls it on the real
device after seeding the random generator, so every rank builds the same initial weights.
"""

from __future__ import annotations

import contextlib
import hashlib
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


class ModelFileChangedError(ModelSpecError):
    """The MODEL file's sha256 differs from the one the plan recorded; the file was not imported."""


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


SHA_ATTRIBUTE = "__meshplan_sha256__"
"""Set on an imported MODEL module: the sha256 of the bytes it was executed from."""


def model_file_path(source: str, base_dir: Path | None = None) -> Path:
    """The file a MODEL reference names: `file.py` of `file.py:function`, the config.json of an `hf:` source."""
    if source.startswith("hf:"):
        from planner.hf_source import config_file_of

        return config_file_of(source, base_dir)
    return resolve_model_source(source, base_dir)[0]


def model_file_sha256(source: str, base_dir: Path | None = None) -> str:
    """sha256 (hex) of the file a MODEL reference names, as a plan records it in `model.source_sha256`."""
    return hashlib.sha256(model_file_path(source, base_dir).read_bytes()).hexdigest()


def _module_name(path: Path) -> str:
    return f"_meshplan_model_{hashlib.sha256(str(path).encode()).hexdigest()[:16]}"


def import_model_file(source: str, base_dir: Path | None = None, expected_sha256: str | None = None):
    """Import the file of a MODEL reference once per process (later calls reuse the module).

    With `expected_sha256`, the bytes are hashed and compared before anything runs, and those same bytes are
    executed (no window for the file to change between the check and the import); a mismatch raises
    ModelFileChangedError. A file that calls sys.exit() while importing is a ModelSpecError, not an exit.
    An `hf:` source's config.json is only checked (it is data, read by transformers): (None, its path)."""
    path = model_file_path(source, base_dir)
    name = _module_name(path)
    code_bytes = path.read_bytes()
    found = hashlib.sha256(code_bytes).hexdigest()
    module = sys.modules.get(name)
    # a module imported earlier in this process counts only if it ran the expected bytes, and the file on disk
    # (what a rank started now would import) must be those bytes too
    ran = getattr(module, SHA_ATTRIBUTE, found) if module is not None else found
    if expected_sha256 is not None and not expected_sha256 == found == ran:
        raise ModelFileChangedError(
            f"MODEL {source!r}: {path} changed since the plan was made (sha256 {found[:16]}... now, "
            f"{expected_sha256[:16]}... in the plan's model.source_sha256), so it was not imported. Re-run "
            "`meshplan plan` for the new file, or pass --accept-model-change to run it knowingly (the traced "
            "graph must still match the plan's fingerprint)")
    if module is not None or source.startswith("hf:"):
        return module, path
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelSpecError(f"MODEL {source!r}: cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    setattr(module, SHA_ATTRIBUTE, found)
    sys.modules[name] = module
    try:
        exec(compile(code_bytes, str(path), "exec"), module.__dict__)  # the bytes hashed above
    except (Exception, SystemExit) as err:
        del sys.modules[name]
        raise ModelSpecError(f"MODEL {source!r}: importing {path} failed: {_describe(err)}") from err
    return module, path


def _describe(err: BaseException) -> str:
    if isinstance(err, SystemExit):
        return (f"it called sys.exit({err.code!r}) (or raised SystemExit); a MODEL file must define its function "
                "without exiting")
    return f"{type(err).__name__}: {str(err)[:500]}"


def load_model_spec(source: str, base_dir: Path | None = None, device: str | torch.device | None = None,
                    expected_sha256: str | None = None) -> ModelSpec:
    """Import `file.py` (refused unless its sha256 is `expected_sha256`, when given), call `function()` (under
    `torch.device(device)` when given) and validate its ModelSpec.

    An `hf:PATH?...` source (planner/hf_source.py) builds a Hugging Face model from its config instead."""
    if source.startswith("hf:"):
        from planner.hf_source import load_hf_spec

        import_model_file(source, base_dir, expected_sha256)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            result = load_hf_spec(source, base_dir)
        result.validate(f"MODEL {source!r}")
        return result
    _, func_name = resolve_model_source(source, base_dir)
    module, path = import_model_file(source, base_dir, expected_sha256)
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ModelSpecError(f"MODEL {source!r}: {path.name} has no function {func_name!r}")
    try:
        if device is None:
            result = func()
        else:
            with torch.device(device):
                result = func()
    except (Exception, SystemExit) as err:
        if isinstance(err, SystemExit):
            raise ModelSpecError(f"MODEL {source!r}: {func_name}() {_describe(err)}") from err
        raise ModelSpecError(f"MODEL {source!r}: {func_name}() raised {type(err).__name__}: {err}") from err
    if not isinstance(result, ModelSpec):
        raise ModelSpecError(
            f"MODEL {source!r}: {func_name}() must return planner.ModelSpec, got {type(result).__name__}"
        )
    result.validate(f"MODEL {source!r}")
    return result
