"""Shared test setup.

CPU runs of `execute` measure their machine twice inside the run and re-cost the plan on it
(runtime/train.py `measure_machine`): a few seconds per run that the runtime tests do not need, so it is off here
(MESHPLAN_MEASURE_MACHINE=0, inherited by the ranks). tests/test_tune.py switches it on for its own run.
"""

import os

os.environ.setdefault("MESHPLAN_MEASURE_MACHINE", "0")
