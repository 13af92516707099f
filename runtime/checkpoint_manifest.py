"""The manifest of a checkpoint: what meshplan wrote, so `--resume` reads only files it can vouch for.

`manifest.json` lists every file of a checkpoint folder (DCP's shards `__R_0.distcp`, its pickled `.metadata`,
meshplan's `meshplan.json`) with its size and sha256, plus the model fingerprint and the step. Rank 0 writes it
last (after every rank's shards and the metadata are on disk), through a temporary file and `os.replace`, so a
folder either has a complete manifest or none.

Resuming verifies the manifest before torch reads a byte: sizes first (cheap: catches truncation), then
hashes (catches a flipped bit), and only then are `meshplan.json` parsed and DCP's `.metadata` unpickled. A
folder without a manifest, a file missing from it, an extra file, or a size or hash that differs is refused
with the file's name and what to do. Hashing reads the checkpoint once more: about 1 s per GB on one core;
in a torchrun job each rank hashes a share of the files (`verify_checkpoint(..., share=(rank, world))`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_CHUNK_BYTES = 4 * 2**20
MAX_MANIFEST_BYTES = 2**20
"""A manifest is a few hundred bytes per file; anything larger is not one meshplan wrote."""


class CheckpointDamagedError(ValueError):
    """A checkpoint folder whose files differ from its manifest (or that has none); the message names the file."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, step: int, fingerprint: str) -> Path:
    """Hash every file in `folder` and write `folder/manifest.json` atomically (temporary file + os.replace)."""
    files = {}
    for path in sorted(folder.iterdir()):
        if path.name in (MANIFEST, MANIFEST + ".tmp"):
            continue
        if not path.is_file():
            raise CheckpointDamagedError(f"checkpoint {folder}: {path.name} is not a regular file; DCP writes "
                                         "only files here")
        files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    body = json.dumps({"manifest_version": MANIFEST_VERSION, "step": step, "fingerprint": fingerprint,
                       "files": files}, indent=1, sort_keys=True)
    tmp = folder / (MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(body)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, folder / MANIFEST)
    return folder / MANIFEST


def _what_to_do(folder: Path) -> str:
    return (f"delete {folder} (and fix `latest` to name the previous checkpoint, which must still be in "
            f"{folder.parent}) to resume from the previous one, or run without --resume to start from step 0")


def read_manifest(folder: Path) -> dict:
    """The manifest of `folder`, checked for form (not yet against the files)."""
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointDamagedError(f"checkpoint {folder} has no {MANIFEST}: it was not written completely by "
                                     f"this meshplan (or the manifest was removed), so its files cannot be "
                                     f"verified and are not read. To do: {_what_to_do(folder)}")
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ValueError(f"larger than {MAX_MANIFEST_BYTES} bytes")
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"]
        if data.get("manifest_version") != MANIFEST_VERSION or not isinstance(files, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
                for v in files.values()) or not isinstance(data.get("step"), int):
            raise ValueError("unexpected fields")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise CheckpointDamagedError(f"checkpoint {folder}: {MANIFEST} is damaged ({type(err).__name__}: "
                                     f"{str(err)[:200]}); its files are not read. To do: {_what_to_do(folder)}") \
            from err
    return data


def verify_checkpoint(folder: Path, share: tuple[int, int] = (0, 1)) -> dict:
    """Check every file of `folder` against its manifest; return the manifest, or raise CheckpointDamagedError.

    `share` = (index, count): hash only the files whose position in the sorted list is index mod count (the
    sizes and the file list are always checked in full), so `count` processes verify one checkpoint together."""
    manifest = read_manifest(folder)
    listed = manifest["files"]
    present = {p.name for p in folder.iterdir() if p.name != MANIFEST}
    for name in sorted(set(listed) - present):
        raise CheckpointDamagedError(f"checkpoint {folder}: file {name} listed in {MANIFEST} is missing. "
                                     f"To do: {_what_to_do(folder)}")
    for name in sorted(present - set(listed)):
        raise CheckpointDamagedError(f"checkpoint {folder}: file {name} is not in {MANIFEST} (meshplan did not "
                                     f"write it), so the checkpoint is not read. To do: remove {folder / name} "
                                     "if you put it there, or " + _what_to_do(folder))
    for name in sorted(listed):
        size = (folder / name).stat().st_size
        if size != listed[name]["bytes"]:
            raise CheckpointDamagedError(f"checkpoint {folder}: file {name} has {size:,} bytes but {MANIFEST} "
                                         f"says {listed[name]['bytes']:,} (truncated or overwritten); nothing of "
                                         f"it was read. To do: {_what_to_do(folder)}")
    index, count = share
    for position, name in enumerate(sorted(listed)):
        if position % count != index:
            continue
        if sha256_of(folder / name) != listed[name]["sha256"]:
            raise CheckpointDamagedError(f"checkpoint {folder}: file {name} does not match its sha256 in "
                                         f"{MANIFEST} (its bytes changed since meshplan wrote it); nothing of it "
                                         f"was loaded. To do: {_what_to_do(folder)}")
    return manifest
