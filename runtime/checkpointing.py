"""Training checkpoints with torch.distributed.checkpoint (DCP): save every K steps, resume, reshard on load.

What a checkpoint holds: the model and AdamW state as `torch.distributed.checkpoint.state_dict.get_state_dict`
returns them (FSDP2 / DTensor shards, DDP unwrapped, keys are the model's own FQNs), the CPU (and CUDA) RNG
state, and `meshplan.json` (step, model fingerprint, the plan's mesh). The data of step s is
`make_batch(..., s)`, so the step number is the data position. DCP writes each rank's shards plus global
metadata, and loading reshards to whatever mesh the resuming plan has (dp4 zero3 -> dp2 x tp2, ddp, pp).

Layout and crash safety: a save writes `DIR/step-000123.tmp`; after every rank has written (a barrier), rank 0
renames it to `DIR/step-000123`, points `DIR/latest` at it (write a temporary file, then `os.replace`) and
removes all but the newest `KEEP` checkpoints (and earlier crashes' `.tmp` leftovers). A crash mid-write leaves
only a `.tmp` directory, which resume never reads; `latest` always names a complete checkpoint.

Verification (runtime/checkpoint_manifest.py): rank 0 writes `manifest.json` (size and sha256 of every file,
the model fingerprint, the step) last, before the rename; `--resume` verifies it before torch reads a byte, so a
truncated or bit-flipped shard, or a crafted `.metadata`, is refused (never unpickled) with the file's name.
A save that fails (a full disk: DCP raises CheckpointException on every rank) removes its `.tmp` folder and
says how much space the checkpoint needs.

Pipeline plans train an `nn.ModuleList` of stage modules whose parameters keep the original FQNs, so
get_state_dict's keys gain the list index (`0.blocks.2.attn.q.weight`); the index is dropped on save and put
back on load, so pipeline and non-pipeline plans read each other's checkpoints.

zero1 and ddp with tensor parallelism: get_state_dict fails on both (ZeroRedundancyOptimizer has no state dict
until `consolidate_state_dict(to=rank)` gathers the whole state onto one rank; DDP's 2-D path holds
tensor-parallel parameters as plain local shards); runtime/ddp_state.py writes the same flattened layout
from the parameters DDP holds and each rank's own optimizer partition, so these plans save, resume and reshard
like the others.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from planner.plan import Plan
from planner.plan_schema import PlanError
from runtime.checkpoint_manifest import MANIFEST, CheckpointDamagedError, verify_checkpoint, write_manifest
from runtime.ddp_state import ddp_state_dicts, needs_ddp_state, restore_hyperparameters

KEEP = 2
"""Complete checkpoints kept; older ones are deleted after each save."""
LATEST = "latest"
META = "meshplan.json"
MAX_POINTER_BYTES = 256
"""`latest` holds one folder name; a larger file is not one meshplan wrote."""
STEP_DIR = re.compile(r"^step-(\d+)$")
OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
"""Flat optimizer keys (`state.<fqn>.exp_avg`, `param_groups.<fqn>.lr`): each entry names its parameter, so
ranks holding different parameters (pipeline stages) and different meshes agree on the keys."""


class CheckpointSaveError(PlanError):
    """A checkpoint could not be written (a full disk, permissions); its partial folder was removed."""


@dataclass
class CheckpointOptions:
    """Where and how often to checkpoint, and whether to resume from the latest checkpoint there."""

    directory: str | os.PathLike
    every: int | None = None
    """Save every this many steps (and always after the last step); None saves only at the end."""
    resume: bool = False

    def validate(self) -> None:
        if self.every is not None and (isinstance(self.every, bool) or not isinstance(self.every, int)
                                       or self.every < 1):
            raise PlanError(f"checkpoint_every must be a positive integer, got {self.every!r}")
        path = Path(self.directory)
        if path.exists() and not path.is_dir():
            raise PlanError(f"checkpoint_dir {path} exists and is not a directory; give a directory path")
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise PlanError(f"checkpoint_dir {path}: {existing} is a regular file, so no folder can be made under "
                            "it; give a directory path")
        if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
            raise PlanError(f"checkpoint_dir {path}: {existing} is not writable by this user; give a folder you "
                            "can write to")

    def cli_args(self) -> list[str]:
        args = ["--checkpoint-dir", str(Path(self.directory).resolve())]
        if self.every is not None:
            args += ["--checkpoint-every", str(self.every)]
        return args + (["--resume"] if self.resume else [])


def _step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def complete_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in `directory`, oldest first: folders named step-NNNNNN (never
    `.tmp`) holding meshplan's files. A folder is renamed from `.tmp` only after its manifest is written, so one
    with meshplan.json but a missing or wrong manifest is damaged: verification refuses it rather than skip it."""
    if not directory.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in directory.iterdir()
             if path.is_dir() and (match := STEP_DIR.match(path.name)) and _is_complete(path)]
    return sorted(found)


def _is_complete(path: Path) -> bool:
    return (path / META).is_file() or (path / MANIFEST).is_file()


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint `DIR/latest` names, or the newest complete one if the pointer is missing; None if none."""
    directory = Path(directory)
    pointer = directory / LATEST
    if pointer.is_file():
        fix = (f"write the name of a checkpoint folder (step-NNNNNN) into {pointer}, or delete it to resume from "
               "the newest folder")
        with open(pointer, "rb") as handle:
            raw = handle.read(MAX_POINTER_BYTES + 1)
        try:
            name = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise PlanError(f"--resume: {pointer} is not text (meshplan writes one folder name there); {fix}") \
                from None
        if len(raw) > MAX_POINTER_BYTES or not STEP_DIR.match(name):
            raise PlanError(f"--resume: {pointer} does not hold a checkpoint folder name (got {name[:40]!r}); {fix}")
        path = directory / name
        if path.is_dir() and _is_complete(path):
            return path
    complete = complete_checkpoints(directory)
    return complete[-1][1] if complete else None


def read_checkpoint_meta(path: Path) -> dict:
    """meshplan.json of a checkpoint (call after verify_checkpoint); PlanError when it is not what meshplan wrote."""
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or isinstance(meta.get("step"), bool) or not isinstance(meta.get("step"), int):
            raise ValueError("no integer 'step'")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise PlanError(f"checkpoint {path}: {META} is not meshplan's ({type(err).__name__}: {str(err)[:200]}); "
                        "delete this checkpoint folder to resume from the previous one, or drop --resume") from err
    return meta


def verified_checkpoint(path: Path, share: tuple[int, int] = (0, 1)) -> dict:
    """Verify `path` against its manifest (runtime/checkpoint_manifest.py) and return its meshplan.json; a damaged
    checkpoint is a PlanError that names the file and the previous checkpoint to fall back to."""
    try:
        verify_checkpoint(path, share)
    except CheckpointDamagedError as err:
        older = [p.name for step, p in complete_checkpoints(path.parent) if p != path and p.name < path.name]
        previous = f" The previous checkpoint is {older[-1]}." if older else " There is no earlier checkpoint."
        raise PlanError(f"--resume: {err}.{previous}") from err
    return read_checkpoint_meta(path)


def check_checkpoint_matches(meta: dict, plan: Plan, path: Path) -> None:
    """Refuse a checkpoint of another model (its graph fingerprint differs from the plan's)."""
    if meta.get("fingerprint") != plan.model.fingerprint:
        raise PlanError(f"checkpoint {path} is of a different model: fingerprint {meta.get('fingerprint')} "
                        f"({meta.get('model_source')}) in the checkpoint, {plan.model.fingerprint} "
                        f"({plan.model.source}) in the plan; resume from a checkpoint of this model or drop --resume")


def _is_pipeline(model: nn.Module, plan: Plan) -> bool:
    return plan.mesh.pp > 1 and isinstance(model, nn.ModuleList)


def _strip_stage_index(key: str) -> str:
    """`0.blocks.2.w` -> `blocks.2.w`; `state.1.head.w.exp_avg` -> `state.head.w.exp_avg`."""
    return re.sub(r"^((?:state|param_groups)\.)?\d+\.", r"\1", key)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, plan: Plan,
           with_cuda_rng: bool) -> tuple[dict, dict, dict]:
    """The DCP state dict (keys as saved) and the model / optimizer dicts in get_state_dict's own keys."""
    if needs_ddp_state(plan):
        model_sd, optim_sd = ddp_state_dicts(model, optimizer)
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=OPTIONS)
    if _is_pipeline(model, plan):
        saved_model = {_strip_stage_index(k): v for k, v in model_sd.items()}
        saved_optim = {_strip_stage_index(k): v for k, v in optim_sd.items()}
    else:
        saved_model, saved_optim = model_sd, optim_sd
    state = {"model": saved_model, "optim": saved_optim, "rng": {"cpu": torch.get_rng_state()}}
    if with_cuda_rng:
        state["rng"]["cuda"] = torch.cuda.get_rng_state()
    return state, model_sd, optim_sd


def _local_bytes(state: dict) -> int:
    """Bytes of the tensors this rank holds in a state dict (DTensors: the local shard)."""
    total = 0
    for value in state.values():
        if isinstance(value, dict):
            total += _local_bytes(value)
        elif isinstance(value, torch.Tensor):
            local = value.to_local() if hasattr(value, "to_local") else value
            total += local.numel() * local.element_size()
    return total


def _underlying_error(err: BaseException) -> BaseException:
    """The first rank's own exception inside torch's CheckpointException (or `err` itself)."""
    if isinstance(err, CheckpointException) and err.failures:
        return next(iter(err.failures.values()))[0]
    return err


def _save_failed(tmp: Path, err: BaseException, needed_bytes: int) -> CheckpointSaveError:
    """Remove the partial folder and describe the failure (how much space the checkpoint needs when it is ENOSPC)."""
    shutil.rmtree(tmp, ignore_errors=True)
    cause = _underlying_error(err)
    free = shutil.disk_usage(tmp.parent).free if tmp.parent.exists() else 0
    # torch's zip writer reports a failed write as "unexpected pos" (RuntimeError), so the free space decides too
    no_space = (isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)) \
        or "No space left" in str(cause) or free < needed_bytes
    if no_space:
        return CheckpointSaveError(f"saving checkpoint {tmp.name} failed: no space left on the device of "
                                   f"{tmp.parent}; the partial folder was removed. A checkpoint of this run needs "
                                   f"about {needed_bytes / 2**20:,.1f} MiB and {free / 2**20:,.1f} MiB are free "
                                   f"now (with KEEP={KEEP} checkpoints kept, plan for "
                                   f"{(KEEP + 1) * needed_bytes / 2**20:,.1f} MiB); free space or give another "
                                   "--checkpoint-dir")
    text = str(cause).splitlines()[0][:300] if str(cause) else ""
    return CheckpointSaveError(f"saving checkpoint {tmp.name} in {tmp.parent} failed ({type(cause).__name__}: "
                               f"{text}); the partial folder was removed. Check that the folder is writable and "
                               "has room, or give another --checkpoint-dir")


def save_checkpoint(directory: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    plan: Plan) -> Path:
    """Save the state after `step` completed steps into `DIR/step-<step>` (collective: every rank calls it).

    Raises CheckpointSaveError on every rank when a rank could not write (its partial folder removed)."""
    directory = Path(directory)
    final = directory / _step_dir_name(step)
    tmp = directory / (final.name + ".tmp")
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a previous crash's leftover of the same step
    dist.barrier()
    state, _, _ = _state(model, optimizer, plan, torch.cuda.is_available() and torch.cuda.is_initialized())
    needed = torch.tensor([_local_bytes(state)], dtype=torch.int64)
    dist.all_reduce(needed)  # an upper bound: replicated tensors count once per rank, DCP writes them once
    try:
        dcp.save(state, checkpoint_id=tmp)
    except (CheckpointException, OSError) as err:  # DCP gathers every rank's failure and raises on all ranks
        failure = _save_failed(tmp, err, int(needed.item())) if dist.get_rank() == 0 else None
        message = [str(failure) if failure else None]
        dist.broadcast_object_list(message, src=0)
        raise CheckpointSaveError(message[0]) from None
    dist.barrier()  # every rank's shards are on disk
    message = [None]
    if dist.get_rank() == 0:
        try:
            (tmp / META).write_text(json.dumps({"step": step, "fingerprint": plan.model.fingerprint,
                                                "model_source": plan.model.source,
                                                "mesh": [plan.mesh.pp, plan.mesh.dp, plan.mesh.tp],
                                                "data_parallel": plan.data_parallel.kind}))
            write_manifest(tmp, step, plan.model.fingerprint)  # last: a folder with a manifest is complete
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            pointer_tmp = directory / (LATEST + ".tmp")
            pointer_tmp.write_text(final.name + "\n")
            os.replace(pointer_tmp, directory / LATEST)
            for _, old in complete_checkpoints(directory)[:-KEEP]:
                shutil.rmtree(old, ignore_errors=True)
            for leftover in directory.glob("step-*.tmp"):  # earlier crashes' partial writes: never read or needed
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError as err:
            message = [str(_save_failed(tmp, err, int(needed.item())))]
    dist.broadcast_object_list(message, src=0)  # also the barrier: no rank runs ahead of the rename
    if message[0] is not None:
        raise CheckpointSaveError(message[0])
    return final


def resume_step(directory: str | os.PathLike, plan: Plan, steps: int, verify: bool = True) -> tuple[Path, int]:
    """The checkpoint `--resume` loads and its step, after checking it fits `plan` and leaves steps to run.

    Reads only files (no process group): `execute` calls it before launching torchrun, so mistakes are one clear
    PlanError instead of a failed job."""
    path = latest_checkpoint(directory)
    if path is None:
        raise PlanError(f"--resume: no complete checkpoint in {directory} (looked for {LATEST} and step-NNNNNN "
                        f"directories with {META}); run without --resume to start from step 0")
    meta = verified_checkpoint(path) if verify else read_checkpoint_meta(path)
    check_checkpoint_matches(meta, plan, path)
    step = int(meta["step"])
    if step >= steps:
        raise PlanError(f"checkpoint {path} is at step {step} and --steps {steps} asks for no more; --steps is the "
                        f"total step count, pass more than {step}")
    return path, step


def load_checkpoint(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    plan: Plan, steps: int) -> int:
    """Load the latest complete checkpoint of `directory` (refused unless its step is below `steps`) into `model`
    and `optimizer`, resharding to this plan's mesh, and restore the RNG state; returns its step. Collective: every
    rank calls it."""
    path = latest_checkpoint(directory)
    if path is None:
        raise PlanError(f"--resume: no complete checkpoint in {directory}; run without --resume")
    # every rank hashes a share of the files and all agree before DCP unpickles .metadata or reads a shard
    # (`execute` verified the whole checkpoint before launch; this covers ranks started by hand and a file
    # changed since)
    try:
        verified_checkpoint(path, (dist.get_rank(), dist.get_world_size()))
        problem = None
    except PlanError as err:
        problem = str(err)
    problems: list = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    if any(problems):
        raise PlanError(next(p for p in problems if p))
    path, step = resume_step(directory, plan, steps, verify=False)
    meta = read_checkpoint_meta(path)
    saved_keys = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    cuda_rng = "rng.cuda" in saved_keys and torch.cuda.is_available()  # a CPU run's checkpoint has none
    state, model_sd, optim_sd = _state(model, optimizer, plan, cuda_rng)
    try:
        dcp.load(state, checkpoint_id=path)
    except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
        cause = _underlying_error(err)
        text = str(cause).splitlines()[0][:300] if str(cause) else ""
        raise PlanError(f"could not load checkpoint {path} into this plan ({type(cause).__name__}: {text}); it was "
                        f"saved under mesh pp x dp x tp = {meta.get('mesh')} with {meta.get('data_parallel')}") \
            from err
    # dcp.load filled the tensors of `state` in place; they are the same objects as in model_sd / optim_sd
    # (renamed keys only), but non-tensor values (param_groups' lr, ...) were replaced, so copy them back
    if _is_pipeline(model, plan):
        for source, target in ((state["model"], model_sd), (state["optim"], optim_sd)):
            for key in target:
                target[key] = source[_strip_stage_index(key)]
    else:
        model_sd, optim_sd = state["model"], state["optim"]
    if needs_ddp_state(plan):  # tensors were loaded in place into the parameters and the optimizer state
        restore_hyperparameters(optimizer, model, optim_sd)
    else:
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=OPTIONS)
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return step
