"""The environment meshplan starts its torchrun ranks with, so they import meshplan's code and nothing else.

`torchrun -m meshplan.cli` (and `-m costmodel.calibrate`) would start each rank as `python -m ...`, which puts
the current directory first on sys.path: a folder of the user's named `runtime/`, `planner/` or `costmodel/`
would then be imported, and run, in every rank instead of meshplan's packages. The ranks therefore start with
PYTHONSAFEPATH=1 (Python 3.11+: nothing is prepended to sys.path), and the folder that holds this meshplan goes
first on PYTHONPATH unless it is a site directory (where an installed meshplan is found anyway).
"""

from __future__ import annotations

import os
import site
from pathlib import Path


def rank_import_environment() -> dict[str, str]:
    """Variables to add to the ranks' environment (see the module docstring)."""
    env = {"PYTHONSAFEPATH": "1"}
    root = str(Path(__file__).resolve().parents[1])
    site_dirs = {str(Path(d).resolve()) for d in [*site.getsitepackages(), site.getusersitepackages()]}
    if root not in site_dirs:
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    return env
