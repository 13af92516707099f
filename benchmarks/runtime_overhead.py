"""meshplan's runtime vs the same training written by hand with torch.distributed, side by side on 4 CPU ranks.

    python benchmarks/runtime_overhead.py [--steps 12] [--repeats 3]

Two configurations of the example GPT, each run by meshplan (`runtime.train.run_rank` on the plan, what
`meshplan execute` runs on every rank) and by hand-written torch-native code in this file, alternating which goes
first, in one torchrun launch:
- dp2 x tp2 zero3: `init_device_mesh`, `parallelize_module` with ColwiseParallel (q, k, v, fc; DTensor
  outputs so the attention's `view` sees global sizes, as meshplan does) / RowwiseParallel (proj), then
  `fully_shard` per block and on the root, AdamW.
- pp2 x dp2 1f1b zero3 (2 micro-batches per dp rank): `torch.distributed.pipelining.pipeline` split before
  blocks.2, `fully_shard` on the stage's blocks and the stage, `Schedule1F1B`, AdamW.
The hand-written code runs twice: with FSDP groups per block and the root (what one usually writes), and with
the groups meshplan makes (also the embeddings, final norm and head), which separates the runtime's own
overhead from the cost of its grouping. Prints, per configuration and repeat, the median step time (slowest
rank, first step excluded; meshplan also skips its memory-tracked step) and the ratio meshplan / hand-written
(<= 1.03 is the goal). The machine is shared and 4 processes share its cores: read the range over repeats.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GPT = f"{ROOT}/examples/gpt.py:build_gpt"
SEED = 0


def make_plans(directory: Path) -> dict[str, Path]:
    """The planner's dp2 x tp2 plan made tensor-parallel and zero3, and a pp2 x dp2 1f1b plan; saved as YAML."""
    from planner.api import plan
    from planner.model_graph import build_model_graph
    from planner.model_spec import load_model_spec
    from planner.plan import DataParallelPlan, TensorParallelUnitPlan

    tp_plan = plan(GPT, "cpu", 4, mesh=(1, 2, 2))
    units = {layer.path: layer.tp_units for layer in build_model_graph(load_model_spec(GPT, device="meta")).layers}
    for layer in tp_plan.layers:
        if units[layer.path]:
            layer.strategy = "tensor"
            layer.tensor_parallel = [TensorParallelUnitPlan(list(u.colwise), u.rowwise) for u in units[layer.path]]
    tp_plan.data_parallel = DataParallelPlan(kind="zero3")
    pp_plan = copy.deepcopy(plan(GPT, "cpu", 2, mesh=(1, 2, 1)))
    pp_plan.data_parallel = DataParallelPlan(kind="zero3")
    pp_plan.world_size, pp_plan.mesh.pp = 4, 2
    pp_plan.pipeline.schedule, pp_plan.pipeline.num_microbatches, pp_plan.pipeline.virtual_stages = "1f1b", 2, 1
    stage = 0
    for layer in pp_plan.layers:
        stage += layer.path == "blocks.2"
        layer.stage = stage
    files = {}
    for name, p in (("dp2xtp2_zero3", tp_plan), ("pp2xdp2_1f1b", pp_plan)):
        p.seed = SEED
        p.validate(name)
        files[name] = directory / f"{name}.yaml"
        p.save(files[name])
    return files


def timed_steps(step, steps: int) -> list[float]:
    """Wall time of each step after a barrier (as run_rank times it), the first (warm-up) step dropped."""
    import torch.distributed as dist

    times = []
    for index in range(steps):
        dist.barrier()
        start = time.perf_counter()
        step(index)
        times.append(time.perf_counter() - start)
    return times[1:]


def shard_units(module, fine: bool) -> list:
    """The modules a hand-written script gives their own `fully_shard` group (before the root): every block, and
    with `fine` also the embeddings, final norm and head (the groups meshplan's runtime makes: one per layer
    of the plan's chain that has parameters)."""
    units = list(module.blocks.children())
    if fine:
        units += [child for name, child in module.named_children()
                  if name != "blocks" and any(True for _ in child.parameters())]
    return units


def hand_written_tp(steps: int, fine: bool) -> list[float]:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.experimental import implicit_replication
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from planner.model_spec import load_model_spec

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(SEED)
    spec = load_model_spec(GPT)
    model = spec.model
    col = ColwiseParallel(use_local_output=False)
    for block in model.blocks:
        parallelize_module(block, mesh["tp"], {"attn.q": col, "attn.k": col, "attn.v": col,
                                               "attn.proj": RowwiseParallel(), "mlp.fc": col,
                                               "mlp.proj": RowwiseParallel()})
    for unit in shard_units(model, fine):
        fully_shard(unit, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate)
    dp_rank = mesh["dp"].get_local_rank()

    def step(index: int) -> None:
        (inputs,), targets = spec.make_batch(spec.global_batch_size, index)
        with sdpa_kernel([SDPBackend.MATH]), implicit_replication():
            loss = spec.loss_fn(model(inputs.chunk(2)[dp_rank]), targets.chunk(2)[dp_rank])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed_steps(step, steps)


def hand_written_pp(steps: int, fine: bool) -> list[float]:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.pipelining import Schedule1F1B, SplitPoint, pipeline

    from planner.model_spec import load_model_spec

    mesh = init_device_mesh("cpu", (2, 2, 1), mesh_dim_names=("pp", "dp", "tp"))
    torch.manual_seed(SEED)
    spec = load_model_spec(GPT)
    microbatches, dp = 2, 2
    (example,), _ = spec.make_batch(spec.global_batch_size // dp // microbatches, 0)
    pipe = pipeline(spec.model, (example,), split_spec={"blocks.2": SplitPoint.BEGINNING})
    pp_rank, dp_rank = mesh["pp"].get_local_rank(), mesh["dp"].get_local_rank()
    module = pipe.get_stage_module(pp_rank)
    for unit in shard_units(module, fine):
        fully_shard(unit, mesh=mesh["dp"])
    fully_shard(module, mesh=mesh["dp"])
    stage = pipe.build_stage(pp_rank, torch.device("cpu"), group=mesh["pp"].get_group())
    schedule = Schedule1F1B(stage, n_microbatches=microbatches, loss_fn=spec.loss_fn, scale_grads=True)
    optimizer = torch.optim.AdamW(module.parameters(), lr=spec.learning_rate)

    def step(index: int) -> None:
        (inputs,), targets = spec.make_batch(spec.global_batch_size, index)
        if pp_rank == 0:
            schedule.step(inputs.chunk(dp)[dp_rank])
        else:
            schedule.step(target=targets.chunk(dp)[dp_rank], losses=[])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed_steps(step, steps)


def meshplan_run(plan_file: Path, steps: int) -> list[float]:
    from planner.plan import Plan
    from runtime.train import run_rank

    return run_rank(Plan.load(plan_file), steps, plan_file.parent).step_times_s


def slowest_median_s(times: list[float]) -> float:
    """The median step time of the slowest rank (collective)."""
    import torch.distributed as dist

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, statistics.median(times))
    return max(gathered)


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    plans = json.loads(args.plans)
    hand = {"dp2xtp2_zero3": hand_written_tp, "pp2xdp2_1f1b": hand_written_pp}
    rows = []
    for name, plan_file in plans.items():
        for repeat in range(args.repeats):
            runs = [("meshplan", lambda p=plan_file: meshplan_run(Path(p), args.steps)),
                    ("hand", lambda n=name: hand[n](args.steps, fine=False)),
                    ("hand_fine", lambda n=name: hand[n](args.steps, fine=True))]
            runs = runs[repeat % len(runs):] + runs[:repeat % len(runs)]  # rotate who goes first
            medians = {}
            for who, run in runs:
                medians[who] = slowest_median_s(run())
                gc.collect()
            rows.append((name, repeat, medians["meshplan"], medians["hand"], medians["hand_fine"]))
    if dist.get_rank() == 0:
        print(f"\n{'config':<16}{'repeat':>7}{'meshplan (ms)':>15}{'hand (ms)':>12}{'ratio':>8}"
              f"{'hand, same groups (ms)':>24}{'ratio':>8}")
        for name, repeat, mine, theirs, fine in rows:
            print(f"{name:<16}{repeat:>7}{mine * 1e3:>15.2f}{theirs * 1e3:>12.2f}{mine / theirs:>8.3f}"
                  f"{fine * 1e3:>24.2f}{mine / fine:>8.3f}")
        for name in plans:
            for label, column in (("hand-written (blocks + root)", 3), ("hand-written (same FSDP groups)", 4)):
                ratios = [row[2] / row[column] for row in rows if row[0] == name]
                print(f"{name}: meshplan / {label}: median {statistics.median(ratios):.3f}, range "
                      f"{min(ratios):.3f}-{max(ratios):.3f} over {len(ratios)} repeats of {args.steps} steps")
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="steps per run (the first is not timed)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side per configuration")
    parser.add_argument("--plans", help=argparse.SUPPRESS)  # set when this script runs as the torchrun worker
    args = parser.parse_args()
    if args.plans:
        worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="meshplan-overhead-") as tmp:
        plans = {name: str(path) for name, path in make_plans(Path(tmp)).items()}
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", __file__,
                   "--steps", str(args.steps), "--repeats", str(args.repeats), "--plans", json.dumps(plans)]
        sys.exit(subprocess.run(command, env=env).returncode)


if __name__ == "__main__":
    main()
