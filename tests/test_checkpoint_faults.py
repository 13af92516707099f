"""Damaged checkpoints are refused before torch reads them, and a decoy package in the working directory never runs.

One real run (module fixture): `meshplan execute` of the MLP on 1 rank for 2 steps, checkpointing every step,
started as a user starts it (the installed `meshplan` command, else `python -P -m meshplan.cli`) from a working
directory holding decoy `runtime/`, `planner/` and `costmodel/` packages that leave a marker file when imported.
Each damage is then applied to a copy of that checkpoint folder and `meshplan execute --resume` runs in this
process with the launcher trapped: exit 2, the damaged file named, the previous checkpoint named, no rank started
and nothing unpickled. The ranks' own check (`load_checkpoint`, which also covers ranks started by hand) runs on
a 1-rank gloo group in this process. A full disk is a 64 KiB tmpfs (needs the right to mount; skipped with the
reason where the test has none).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from meshplan.cli import main
from planner.api import plan
from planner.plan_schema import PlanError
from runtime.checkpointing import CheckpointSaveError, load_checkpoint, resume_step, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
MLP = f"{ROOT}/tests/models.py:build_mlp"
DECOYS = ("runtime", "planner", "costmodel")


def meshplan_command() -> list[str]:
    """The installed console script (its sys.path starts at its own folder), else python -P (no cwd on sys.path)."""
    script = Path(sys.executable).with_name("meshplan")
    return [str(script)] if script.is_file() else [sys.executable, "-P", "-m", "meshplan.cli"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Plan the MLP for 1 rank and train 2 steps from a folder of decoys; returns (plan file, checkpoints, cwd)."""
    work = tmp_path_factory.mktemp("decoy_cwd")
    for name in DECOYS:
        (work / name).mkdir()
        (work / name / "__init__.py").write_text(f"open({str(work / ('IMPORTED_' + name))!r}, 'w').close()\n")
    plan_file = work / "plan.yaml"
    plan(MLP, "cpu", 1).save(plan_file)
    checkpoints = work / "checkpoints"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    done = subprocess.run([*meshplan_command(), "execute", str(plan_file), "--steps", "2", "--checkpoint-dir",
                           str(checkpoints), "--checkpoint-every", "1", "--quiet"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return plan_file, checkpoints, work


def test_decoy_packages_in_the_working_directory_do_not_run(run):
    _, checkpoints, work = run
    assert not sorted(p.name for p in work.glob("IMPORTED_*"))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-000001", "step-000002"]


def test_every_file_of_a_checkpoint_is_in_its_manifest(run):
    plan_file, checkpoints, _ = run
    folder = checkpoints / "step-000002"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["step"] == 2 and set(manifest["files"]) == {p.name for p in folder.iterdir()} - {"manifest.json"}
    assert {".metadata", "meshplan.json"} <= set(manifest["files"])
    from planner.plan import Plan

    assert resume_step(checkpoints, Plan.load(plan_file), 5) == (folder, 2)  # an intact checkpoint resumes


class _Payload:
    """Unpickling runs `open(marker, 'w')`: the file appears only if someone unpickles the crafted .metadata."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40  # an exponent bit of some float: loads fine, trains to inf
    path.write_bytes(bytes(data))


def _craft_metadata(step: Path, marker: Path) -> None:
    """A pickle that runs code, padded to the real file's size (pickle ignores bytes after STOP)."""
    size = (step / ".metadata").stat().st_size
    payload = pickle.dumps(_Payload(marker))
    (step / ".metadata").write_bytes(payload + b" " * (size - len(payload)))


DAMAGES = {
    "shard_truncated": (lambda s, d, m: (s / "__0_0.distcp").write_bytes((s / "__0_0.distcp").read_bytes()[:999]),
                        ["__0_0.distcp has 999 bytes", "truncated"]),
    "shard_bit_flip": (lambda s, d, m: _flip(s / "__0_0.distcp"), ["__0_0.distcp does not match its sha256"]),
    "metadata_truncated": (lambda s, d, m: (s / ".metadata").write_bytes(b"\x80\x04"), [".metadata has 2 bytes"]),
    "metadata_crafted": (lambda s, d, m: _craft_metadata(s, m), [".metadata does not match its sha256"]),
    "manifest_missing": (lambda s, d, m: (s / "manifest.json").unlink(), ["has no manifest.json", "not read"]),
    "manifest_garbage": (lambda s, d, m: (s / "manifest.json").write_text("{\"files\": "),
                         ["manifest.json is damaged", "JSONDecodeError"]),
    "file_added": (lambda s, d, m: (s / "__1_0.distcp").write_bytes(b"x"), ["__1_0.distcp is not in manifest.json"]),
    "file_removed": (lambda s, d, m: (s / "meshplan.json").unlink(), ["meshplan.json listed in manifest.json is "
                                                                      "missing"]),
    "meshplan_json_truncated": (lambda s, d, m: (s / "meshplan.json").write_text("{\"step\": 2, \"fing"),
                                ["meshplan.json has 17 bytes"]),
    "latest_binary": (lambda s, d, m: (d / "latest").write_bytes(b"\xff\xfe\x00\x9c" * 100),
                      ["latest is not text", "write the name of a checkpoint folder"]),
    "latest_outside": (lambda s, d, m: (d / "latest").write_text("../../etc\n"),
                       ["does not hold a checkpoint folder name", "'../../etc'"]),
}


def damaged_copy(run, tmp_path: Path, damage: str) -> tuple[Path, Path]:
    """A copy of the run's checkpoints with `damage` applied to its latest checkpoint; returns (copy, marker)."""
    _, checkpoints, _ = run
    copy = tmp_path / "checkpoints"
    shutil.copytree(checkpoints, copy)
    marker = tmp_path / "UNPICKLED"
    DAMAGES[damage][0](copy / "step-000002", copy, marker)
    return copy, marker


@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_refuses_a_damaged_checkpoint_before_launch(damage, run, tmp_path, monkeypatch, capsys):
    import runtime.execute

    def no_launch(*args, **kwargs):
        raise AssertionError("torchrun was launched on a damaged checkpoint")

    monkeypatch.setattr(runtime.execute, "launch", no_launch)
    plan_file = run[0]
    copy, marker = damaged_copy(run, tmp_path, damage)
    status = main(["execute", str(plan_file), "--steps", "5", "--checkpoint-dir", str(copy), "--resume"])
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err and len(err) < 2000, err
    for text in DAMAGES[damage][1]:
        assert text in err, (text, err)
    if not damage.startswith("latest"):
        assert "step-000002" in err and "The previous checkpoint is step-000001" in err, err
        assert "without --resume" in err
    assert not marker.exists()


@pytest.fixture
def one_rank_group():
    """A 1-rank gloo process group in this process (what each torchrun rank has)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("damage", ["metadata_crafted", "shard_bit_flip"])
def test_ranks_verify_before_dcp_reads_a_byte(damage, run, tmp_path, one_rank_group, monkeypatch):
    """load_checkpoint (each rank's resume) refuses the damage before DCP unpickles `.metadata` or reads a shard."""
    import torch.distributed.checkpoint as dcp

    def no_read(*args, **kwargs):
        raise AssertionError("DCP read a damaged checkpoint")

    monkeypatch.setattr(dcp.FileSystemReader, "read_metadata", no_read)
    from planner.plan import Plan

    copy, marker = damaged_copy(run, tmp_path, damage)
    with pytest.raises(PlanError, match="does not match its sha256 in manifest.json"):
        load_checkpoint(copy, nn.Linear(1, 1), None, Plan.load(run[0]), 5)
    assert not marker.exists()


def _mount_small_tmpfs(path: Path) -> str | None:
    """Mount a 64 KiB tmpfs at `path`; the reason when this process may not."""
    path.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"cannot run mount: {err}"
    return None if done.returncode == 0 else f"mount -t tmpfs refused: {done.stderr.strip()[:200]}"


def test_a_full_disk_removes_the_partial_checkpoint_and_says_how_much_is_needed(run, tmp_path, one_rank_group):
    small = tmp_path / "small"
    reason = _mount_small_tmpfs(small)
    if reason:
        pytest.skip(f"ENOSPC needs a small filesystem: {reason}")
    try:
        from planner.plan import Plan

        model = nn.Linear(128, 128)  # 64 KiB of weights, 192 KiB of state with AdamW's two moments
        optimizer = torch.optim.AdamW(model.parameters())
        model(torch.ones(1, 128)).sum().backward()
        optimizer.step()
        with pytest.raises(CheckpointSaveError) as caught:
            save_checkpoint(small / "checkpoints", 1, model, optimizer, Plan.load(run[0]))
        message = str(caught.value)
        assert "no space left" in message and "the partial folder was removed" in message, message
        assert "needs about 0.2 MiB" in message and "MiB are free" in message, message
        assert sorted(p.name for p in (small / "checkpoints").iterdir()) == []  # no step-000001.tmp left behind
    finally:
        subprocess.run(["umount", str(small)], check=False, timeout=30)
