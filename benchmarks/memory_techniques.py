"""Measured per-rank memory of the data-parallel kinds and per-layer memory techniques, on 4 CPU processes.

    python benchmarks/memory_techniques.py [--steps 3]

Plans the example GPT for 4 CPU ranks, edits the plan as a person would (kind, HSDP, checkpointing, ...), runs
each variant with `execute` and prints rank 0's peak memory of the memory-tracked step by category
(MemTracker: parameters, gradients, optimizer states, activations) and the median step time. On CPU,
parameter and activation offload move nothing (host and device are the same memory): those rows show the
code path runs, not a saving.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from meshplan import execute, plan  # noqa: E402

GPT = f"{ROOT}/examples/gpt.py:build_gpt"
KIB = 1024


def variant(base, kind="zero3", replicate=1, reshard_after_forward=True, offload=False, param_dtype="float32",
            num_microbatches=1, checkpoint="none", offload_activations=False):
    p = copy.deepcopy(base)
    p.data_parallel.kind, p.data_parallel.replicate = kind, replicate
    p.data_parallel.reshard_after_forward, p.data_parallel.offload = reshard_after_forward, offload
    p.precision.param_dtype = param_dtype
    p.pipeline.num_microbatches = num_microbatches
    for layer in p.layers:
        if layer.path.startswith("blocks."):
            layer.checkpoint, layer.offload_activations = checkpoint, offload_activations
    p.validate()
    return p


VARIANTS = [
    ("ddp", dict(kind="ddp")),
    ("zero1", dict(kind="zero1")),
    ("zero1 hsdp 2x2", dict(kind="zero1", replicate=2)),
    ("zero2", dict(kind="zero2")),
    ("zero3", dict()),
    ("zero3 keep params", dict(reshard_after_forward=False)),
    ("zero3 hsdp 2x2", dict(replicate=2)),
    ("zero3 cpu offload", dict(offload=True)),
    ("zero3 bf16", dict(param_dtype="bfloat16")),
    ("zero3 2 micro-batches", dict(num_microbatches=2)),
    ("zero3 ckpt selective", dict(checkpoint="selective")),
    ("zero3 ckpt full", dict(checkpoint="full")),
    ("zero3 offload activations", dict(offload_activations=True)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    base = plan(GPT, "cpu", 4, mesh=(1, 4, 1))
    print(f"GPT example, 4 CPU ranks (dp=4), {args.steps} steps; rank 0 at the peak of the tracked step, KiB")
    header = f"{'variant':<28}{'peak':>8}{'params':>8}{'grads':>8}{'optim':>8}{'activ':>8}{'step ms':>9}"
    print(header)
    for name, edits in VARIANTS:
        report = execute(variant(base, **edits), steps=args.steps, quiet=True)
        rank0 = report.ranks[0]
        mem = rank0.memory_breakdown_bytes
        cells = [rank0.peak_memory_bytes] + [mem.get(k, 0) for k in ("Parameter", "Gradient", "Optstate",
                                                                       "Activation")]
        print(f"{name:<28}" + "".join(f"{c / KIB:>8.0f}" for c in cells) + f"{report.measured_step_time_ms:>9.1f}",
              flush=True)


if __name__ == "__main__":
    main()
