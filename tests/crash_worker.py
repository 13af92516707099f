"""torchrun entry point for the crash-during-checkpoint test: `meshplan execute` with a kill between the DCP
write and the rename that completes a checkpoint.

    torchrun --nproc-per-node=2 --max-restarts=1 tests/crash_worker.py KILL_RANK KILL_STEP STATE_JSON PLAN ARGS...

In the first attempt, rank KILL_RANK dies by SIGKILL right after torch.distributed.checkpoint.save has written
its shards of `step-<KILL_STEP>.tmp` (before the barrier after which rank 0 renames it and moves `latest`). In
the restarted attempt rank 0 first records what the crash left in the checkpoint directory (listing, `latest`)
into STATE_JSON; then every rank runs `meshplan execute PLAN ARGS...`, which resumes by itself.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch.distributed.checkpoint as dcp

from meshplan.cli import main
from runtime.checkpointing import latest_checkpoint


def kill_after_save(rank: int, step: int):
    real_save = dcp.save

    def save(state_dict, *, checkpoint_id=None, **kwargs):
        result = real_save(state_dict, checkpoint_id=checkpoint_id, **kwargs)
        if int(os.environ["RANK"]) == rank and Path(checkpoint_id).name == f"step-{step:06d}.tmp":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    return save


def record_crash_state(state_path: Path, directory: Path) -> None:
    latest = latest_checkpoint(directory)
    state_path.write_text(json.dumps({"listing": sorted(p.name for p in directory.iterdir()),
                                      "latest": latest.name if latest else None}))


if __name__ == "__main__":
    kill_rank, kill_step, state_path, *execute_args = sys.argv[1:]
    restarts = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    if restarts == 0:
        dcp.save = kill_after_save(int(kill_rank), int(kill_step))
    elif os.environ["RANK"] == "0":
        checkpoint_dir = Path(execute_args[execute_args.index("--checkpoint-dir") + 1])
        record_crash_state(Path(state_path), checkpoint_dir)
    sys.exit(main(["execute", *execute_args]))
