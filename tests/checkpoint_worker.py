"""Run under torchrun (4 ranks): checkpoint scenarios through the runtime's own `run_rank`, losses as JSON.

    torchrun --nproc-per-node=4 tests/checkpoint_worker.py out.json WORK_DIR DTYPE zero3.yaml tp.yaml ddp.yaml pp.yaml \
        zero1.yaml ddp_tp.yaml tp2d.yaml ddp_tp2d.yaml pp_ddp.yaml pp_zero1.yaml

zero3.yaml is dp4 zero3; the others are the plans a dp4 zero3 checkpoint is resumed into. Scenarios, in order
(WORK_DIR/<name> is each one's checkpoint directory; rank 0 prepares copies between runs):
- full: 7 steps, no checkpoint (the uninterrupted reference).
- saved: zero3, 4 steps, checkpoint every step (keeps step-3 and step-4).
- crashed: step-3 plus a half-written `step-000004.tmp` (no DCP metadata, no meshplan.json); resume to step 5.
- tp / ddp / pp: saved's checkpoints resumed (from step 4) into the other plans, to step 6.
- from_pp: the pp run's final checkpoint (step 6, written by pipeline stages) resumed into zero3, to step 7.
- zero1 / ddp_tp (runtime/ddp_state.py), tp2d / ddp_tp2d (tensor2d on a 2 x 2 grid, zero3 and ddp): saved's
  checkpoints resumed into them, to step 6; their own final checkpoints resumed into zero3 (from_<name>), to
  step 7.
- pp_ddp / pp_zero1 (pp2 x dp2 with DDP stages; zero1's ZeroRedundancyOptimizer partitions per stage): the same.
"""

from __future__ import annotations

import gc
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from planner.plan import Plan
from runtime.checkpointing import CheckpointOptions, latest_checkpoint, read_checkpoint_meta
from runtime.train import run_rank


def train(plan_path: str, steps: int, checkpoint: CheckpointOptions | None = None) -> list[float]:
    return run_rank(Plan.load(plan_path), steps, Path(plan_path).parent, checkpoint).losses


def on_rank0(action) -> None:
    """Prepare checkpoint directories on rank 0 while the others wait (one shared filesystem)."""
    if dist.get_rank() == 0:
        action()
    dist.barrier()


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def main() -> None:
    out_path, work = sys.argv[1], Path(sys.argv[2])
    torch.set_default_dtype(getattr(torch, sys.argv[3]))
    zero3, tp, ddp, pp, zero1, ddp_tp, tp2d, ddp_tp2d, pp_ddp, pp_zero1 = sys.argv[4:14]
    dist.init_process_group("gloo")
    results: dict = {"full": train(zero3, 7)}
    saved = work / "saved"
    results["saved"] = train(zero3, 4, CheckpointOptions(saved, every=1))
    results["saved_listing"] = listing(saved)

    crashed = work / "crashed"

    def simulate_crash() -> None:
        crashed.mkdir()
        shutil.copytree(saved / "step-000003", crashed / "step-000003")
        (crashed / "latest").write_text("step-000003\n")
        partial = crashed / "step-000004.tmp"
        shutil.copytree(saved / "step-000004", partial)
        (partial / ".metadata").unlink()  # DCP writes its metadata last: the crash came before
        (partial / "meshplan.json").unlink()

    on_rank0(simulate_crash)
    results["crashed"] = train(zero3, 5, CheckpointOptions(crashed, resume=True))
    results["crashed_listing"] = listing(crashed)
    for name, plan_path in (("tp", tp), ("ddp", ddp), ("pp", pp), ("zero1", zero1), ("ddp_tp", ddp_tp),
                            ("tp2d", tp2d), ("ddp_tp2d", ddp_tp2d), ("pp_ddp", pp_ddp), ("pp_zero1", pp_zero1)):
        on_rank0(lambda name=name: shutil.copytree(saved, work / name))
        results[name] = train(plan_path, 6, CheckpointOptions(work / name, resume=True))
    results["pp_checkpoint"] = read_checkpoint_meta(latest_checkpoint(work / "pp"))
    for name in ("pp", "zero1", "ddp_tp", "tp2d", "ddp_tp2d", "pp_ddp", "pp_zero1"):
        results[f"from_{name}"] = train(zero3, 7, CheckpointOptions(work / name, resume=True))
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results))
    gc.collect()  # free sharded models while their process groups live (see parity_worker.py)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
