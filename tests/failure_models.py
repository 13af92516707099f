"""MODELs for the failure tests: tests/models.py's MLP whose make_batch kills or stalls one rank at one step.

The fault is chosen by environment variables that the test sets and torchrun passes to every rank, and fires
only in a rank of the first attempt (TORCHELASTIC_RESTART_COUNT 0), so a group that torchrun restarts runs
clean. Planning (no RANK in the environment) never triggers it, and the model graph is the MLP's own.
- MESHPLAN_TEST_KILL=RANK:STEP   rank RANK dies by SIGKILL when it fetches the batch of step STEP.
- MESHPLAN_TEST_STALL=RANK:STEP  rank RANK sleeps for an hour there instead (a hang its peers wait on).
"""

import importlib.util
import os
import signal
import time
from pathlib import Path

from meshplan import ModelSpec


def _build_mlp() -> ModelSpec:
    """tests/models.py:build_mlp (loaded by path: ranks import MODEL files by path, without tests/ on sys.path)."""
    module_spec = importlib.util.spec_from_file_location("meshplan_tests_models", Path(__file__).with_name("models.py"))
    models = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(models)
    return models.build_mlp()


def _fault_here(variable: str, step: int) -> bool:
    target = os.environ.get(variable)
    if not target or "RANK" not in os.environ or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return False
    rank, at_step = map(int, target.split(":"))
    return rank == int(os.environ["RANK"]) and step == at_step


def build_faulty_mlp() -> ModelSpec:
    spec = _build_mlp()
    make_batch = spec.make_batch

    def faulty_make_batch(batch_size: int, step: int):
        if _fault_here("MESHPLAN_TEST_KILL", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if _fault_here("MESHPLAN_TEST_STALL", step):
            time.sleep(3600)
        return make_batch(batch_size, step)

    spec.make_batch = faulty_make_batch
    return spec
