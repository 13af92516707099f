"""The cost model's count of FSDP2 parameter all-gathers per step equals what the runtime does.

zero2 and zero3, with and without a pipeline, with several micro-batches: the count decides how much
communication a plan is charged and, under a pipeline, that zero3 (m + 1 gathers, and zero2's memory) loses to
zero2 (one gather). Measured by tests/fsdp_gather_worker.py on 4 gloo ranks.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

from test_parity import GPT, ROOT
from test_pipeline_parity import pipeline_plan

from planner.config_space import ParallelConfig
from planner.data_parallel_costs import parameter_gathers_per_step


def _plans():
    flat = pipeline_plan(GPT, 1, 4, 1, "none", 2, ())
    piped = pipeline_plan(GPT, 2, 2, 1, "1f1b", 4, ("blocks.2",))
    plans = {}
    for name, base in (("flat", flat), ("pipelined", piped)):
        for kind in ("zero2", "zero3"):
            p = copy.deepcopy(base)
            p.data_parallel.kind = kind
            p.validate("test")
            plans[f"{name}-{kind}"] = p
    return plans


def test_parameter_gathers_per_step_match_fsdp2(tmp_path):
    plans = _plans()
    files = []
    for name, p in plans.items():
        files.append(tmp_path / f"{name}.yaml")
        p.save(files[-1])
    out = tmp_path / "gathers.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
               str(ROOT / "tests" / "fsdp_gather_worker.py"), str(out), *map(str, files)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-4000:]
    measured = json.loads(out.read_text())
    for (name, p), path in zip(plans.items(), files, strict=True):
        config = ParallelConfig(p.mesh.pp, p.mesh.dp, p.mesh.tp, p.pipeline.num_microbatches,
                                p.pipeline.schedule, 1, p.data_parallel.kind, 1, "float32",
                                p.model.global_batch_size)
        expected = parameter_gathers_per_step(config.data_parallel_setup())
        per_group = measured[str(path)]
        assert per_group, f"{name}: no FSDP group gathered anything"
        assert set(per_group.values()) == {expected}, f"{name}: expected {expected} per group, got {per_group}"
