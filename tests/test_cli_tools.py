"""`meshplan show` tables and --timeline, `validate`, `diff`, re-costing a plan, and the progress bar.

Plans come from examples/gpt.py with pinned meshes; no torchrun is launched. The rank layout is checked against
the runtime's own DeviceMesh (runtime/train.py build_mesh) built under the "fake" process group, and the
timeline's order of actions against torch.distributed.pipelining's schedules.
"""

import copy
import io
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops
from torch.distributed.pipelining.schedules import _ComputationType

from costmodel import load_cluster
from costmodel.progress import ENV, Progress
from meshplan.cli import main
from meshplan.diff import changed_fields
from meshplan.show import format_plan, memory_parts_mib, rank_groups, time_parts_ms
from meshplan.timeline import FORWARD, draw_timeline, plan_timeline
from planner.api import plan
from planner.evaluate_config import even_stage_starts, stages_of_layers
from planner.model_graph import build_model_graph
from planner.model_spec import load_model_spec
from planner.plan import Plan
from planner.recost import recost_plan

ROOT = Path(__file__).resolve().parents[1]
GPT = f"{ROOT}/examples/gpt.py:build_gpt"


@pytest.fixture(scope="module")
def gpt():
    spec = load_model_spec(GPT, device="meta")
    return spec, build_model_graph(spec)


@pytest.fixture(scope="module")
def plans() -> dict[str, Plan]:
    """A pipeline (interleaved 1F1B, chosen by the search), pure data parallel, and dp x tp."""
    return {"pp2": plan(GPT, "cpu", 4, mesh=(2, 2, 1)), "dp4": plan(GPT, "cpu", 4, mesh=(1, 4, 1)),
            "dp2tp2": plan(GPT, "cpu", 4, mesh=(1, 2, 2))}


def cpu_cluster(world_size: int):
    return load_cluster("cpu").for_world_size(world_size)


def with_schedule(base: Plan, gpt, schedule: str, virtual_stages: int, num_microbatches: int) -> Plan:
    """`base` edited to another pipeline schedule (layers re-cut evenly), its prediction re-costed."""
    spec, graph = gpt
    edited = copy.deepcopy(base)
    edited.pipeline.schedule, edited.pipeline.virtual_stages = schedule, virtual_stages
    edited.pipeline.num_microbatches = num_microbatches
    stage_of = stages_of_layers(even_stage_starts(len(edited.layers), edited.num_stages), len(edited.layers))
    for layer, stage in zip(edited.layers, stage_of, strict=True):
        layer.stage = stage
    edited.validate()
    edited.predicted = recost_plan(edited, spec.model, graph, cpu_cluster(edited.world_size)).prediction
    return edited


# ---- re-costing ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["pp2", "dp4", "dp2tp2"])
def test_recosting_an_unedited_plan_reproduces_its_prediction(plans, gpt, name):
    spec, graph = gpt
    p = plans[name]
    recosted = recost_plan(p, spec.model, graph, cpu_cluster(p.world_size))
    assert recosted.fits
    assert recosted.prediction == p.predicted  # every field, to the stored digit
    assert recosted.layers == [(layer.predicted_time_ms, layer.predicted_memory_mib) for layer in p.layers]


def test_prediction_parts_add_up(plans):
    for p in plans.values():
        pred = p.predicted
        assert sum(ms for _, ms in time_parts_ms(pred)) == pytest.approx(pred.step_time_ms, rel=1e-4)
        assert sum(mib for _, mib in memory_parts_mib(pred)) == pytest.approx(pred.peak_memory_mib, abs=0.01)
        assert len(pred.stages) == p.num_stages


def test_recosting_an_edit_changes_the_prediction(plans, gpt):
    spec, graph = gpt
    edited = copy.deepcopy(plans["dp4"])
    for layer in edited.layers:
        if layer.path.startswith("blocks."):
            layer.checkpoint = "full"
    recosted = recost_plan(edited, spec.model, graph, cpu_cluster(4)).prediction
    before = plans["dp4"].predicted
    assert recosted.recompute_ms > 0 and before.recompute_ms == 0
    assert recosted.step_time_ms > before.step_time_ms
    assert recosted.activations_mib < before.activations_mib


# ---- show ---------------------------------------------------------------------------------------------------
def test_show_prints_layout_stages_memory_and_time(plans, tmp_path, capsys):
    path = tmp_path / "plan.yaml"
    plans["pp2"].save(path)
    assert main(["show", str(path), "--why"]) == 0
    out = capsys.readouterr().out
    for expected in ("rank layout", "pipeline rank", "dp group", "tp group", "[0,1] [2,3]",
                     "stage 7 on pipeline rank 1", "blocks.0", "optimizer states", "buffers", "of limit",
                     "pipeline bubble", "recompute", "offload", "alternatives considered"):
        assert expected in out, expected


def test_rank_layout_matches_the_runtime_device_mesh(plans):
    """Every rank's pp / dp / tp (and HSDP shard / replicate) group of the runtime's mesh is listed by show."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from runtime.data_parallel import data_parallel_mesh
    from runtime.tensor_parallel_2d import grid_for
    from runtime.train import build_mesh

    cube = copy.deepcopy(plans["pp2"])
    cube.world_size, cube.mesh.tp = 8, 2
    hsdp = copy.deepcopy(plans["dp2tp2"])
    hsdp.world_size, hsdp.mesh.dp, hsdp.data_parallel.replicate = 8, 4, 2
    grids = copy.deepcopy(plans["dp2tp2"])  # tp 4 as 2 x 2 grids (tensor2d) on 8 ranks
    grids.world_size, grids.mesh.tp = 8, 4
    grids.layers[2].strategy, grids.layers[2].tp_rows = "tensor2d", 2
    for p in (cube, hsdp, grids):
        groups = rank_groups(p)
        for rank in range(p.world_size):
            dist.init_process_group("fake", rank=rank, world_size=p.world_size, store=FakeStore())
            try:
                mesh = build_mesh(p, torch.device("cpu"))
                assert mesh["pp"].mesh.tolist() in groups["pp group"]
                assert mesh["dp"].mesh.tolist() in groups["dp group"]
                assert mesh["tp"].mesh.tolist() in groups["tp group"]
                assert rank in groups["pipeline rank"][mesh.get_coordinate()[0]]
                if grids is p:
                    grid = grid_for(mesh["tp"], 2)
                    assert grid["tp_rows2"].mesh.tolist() in groups["tp 2x2 rows axis"]
                    assert grid["tp_cols2"].mesh.tolist() in groups["tp 2x2 cols axis"]
                if p.data_parallel.replicate > 1:
                    dp_mesh = data_parallel_mesh(p, mesh)
                    assert dp_mesh["dp_shard"].mesh.tolist() in groups["dp shard group"]
                    assert dp_mesh["dp_replicate"].mesh.tolist() in groups["dp replicate group"]
            finally:
                dist.destroy_process_group()


def test_plans_without_the_new_prediction_fields_still_load_and_show(plans, tmp_path, capsys):
    data = yaml.safe_load(plans["pp2"].to_yaml())
    for key in ("buffers_mib", "offload_ms", "stages"):
        del data["predicted"][key]
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    old = Plan.load(path)
    assert old.predicted.buffers_mib is None and old.predicted.stages == []
    text = format_plan(old)
    assert "activations + buffers" in text and "communication + offload" in text
    boxes, note = plan_timeline(old)
    assert "estimated" in note and len(boxes) == 2 * old.pipeline.num_microbatches * old.num_stages


# ---- timeline -----------------------------------------------------------------------------------------------
def drawn_order(p: Plan) -> dict[int, list[str]]:
    boxes, _ = plan_timeline(p)
    order: dict[int, list] = {}
    for box in sorted(boxes, key=lambda b: (b.rank, b.start_ms)):
        order.setdefault(box.rank, []).append(str(box.action))
    return order


def torch_order(schedule_class, pp: int, m: int, v: int) -> dict[int, list[str]]:
    ops = get_schedule_ops(schedule_class, pp, m, v)
    return {rank: [str(a) for a in actions if a is not None and a.computation_type in
                   (_ComputationType.FORWARD, _ComputationType.FULL_BACKWARD)] for rank, actions in enumerate(ops)}


def test_timeline_follows_torch_interleaved_and_gpipe_orders(plans, gpt):
    interleaved = plans["pp2"]
    assert interleaved.pipeline.schedule == "interleaved_1f1b"
    assert drawn_order(interleaved) == torch_order(ScheduleInterleaved1F1B, 2, interleaved.pipeline.num_microbatches,
                                                   interleaved.pipeline.virtual_stages)
    longer = with_schedule(interleaved, gpt, "interleaved_1f1b", 2, 4)
    assert drawn_order(longer) == torch_order(ScheduleInterleaved1F1B, 2, 4, 2)
    gpipe = with_schedule(interleaved, gpt, "gpipe", 1, 4)
    assert drawn_order(gpipe) == torch_order(ScheduleGPipe, 2, 4, 1)


def test_timeline_1f1b_is_the_order_schedule1f1b_runs(plans, gpt):
    """Schedule1F1B's pipeline_order matches its loop on every rank but the last, where torch 2.13 starts it at
    micro-batch 1; the drawn order is the loop's: warm-up of (stages - stage) forwards, then 1B1F."""
    p = with_schedule(plans["pp2"], gpt, "1f1b", 1, 4)
    drawn = drawn_order(p)
    described = torch_order(Schedule1F1B, 2, 4, 1)
    assert drawn[0] == described[0] == ["0F0", "0F1", "0B0", "0F2", "0B1", "0F3", "0B2", "0B3"]
    assert drawn[1] == ["1F0", "1B0", "1F1", "1B1", "1F2", "1B2", "1F3", "1B3"]


def test_timeline_timing_respects_dependencies_and_bubble(plans, gpt):
    p = with_schedule(plans["pp2"], gpt, "gpipe", 1, 4)
    boxes, note = plan_timeline(p)
    assert note == ""
    end = {(b.action.stage_index, b.action.computation_type, b.action.microbatch_index): b.end_ms for b in boxes}
    for b in boxes:
        a = b.action
        forward_ms, backward_ms = p.predicted.stages[a.stage_index].forward_ms, p.predicted.stages[a.stage_index] \
            .backward_ms
        assert b.end_ms - b.start_ms == pytest.approx(forward_ms if a.computation_type == FORWARD else backward_ms)
        if a.computation_type == FORWARD and a.stage_index > 0:
            assert b.start_ms >= end[(a.stage_index - 1, FORWARD, a.microbatch_index)] - 1e-9
    # GPipe: rank 1 waits for rank 0's first forward, so the step is longer than either rank's busy time
    makespan = max(b.end_ms for b in boxes)
    busy = [sum(b.end_ms - b.start_ms for b in boxes if b.rank == r) for r in range(2)]
    assert makespan > max(busy)


def test_timeline_png_is_written(plans, tmp_path, capsys):
    path = tmp_path / "timeline.png"
    boxes = draw_timeline(plans["pp2"], str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert {b.rank for b in boxes} == {0, 1}
    flat = tmp_path / "flat.yaml"
    plans["dp4"].save(flat)
    assert main(["show", str(flat), "--timeline", str(tmp_path / "flat.png")]) == 0
    assert "no pipeline" in capsys.readouterr().out
    assert (tmp_path / "flat.png").stat().st_size > 0
    boxes, _ = plan_timeline(plans["dp4"])
    m = plans["dp4"].pipeline.num_microbatches
    assert [str(b.action) for b in boxes] == [f"0{kind}{i}" for i in range(m) for kind in "FB"]


# ---- validate -----------------------------------------------------------------------------------------------
def write_plan(tmp_path: Path, p: Plan, edit=None, name: str = "plan.yaml") -> str:
    data = yaml.safe_load(p.to_yaml())
    if edit:
        edit(data)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def test_validate_an_unedited_plan(plans, tmp_path, capsys):
    path = write_plan(tmp_path, plans["dp2tp2"])
    assert main(["validate", path, GPT, "--cluster", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "re-costed" in out and "fits" in out and "layers whose prediction changed" not in out


def test_validate_reprices_an_edited_plan(plans, tmp_path, capsys):
    def checkpoint_blocks(data):
        for layer in data["layers"]:
            if layer["path"].startswith("blocks."):
                layer["checkpoint"] = "full"

    path = write_plan(tmp_path, plans["dp4"], checkpoint_blocks)
    assert main(["validate", path, GPT, "--cluster", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "layers whose prediction changed" in out and "blocks.3" in out


BLOCK_UNITS = [{"colwise": ["attn.k", "attn.q", "attn.v"], "rowwise": "attn.proj"},
               {"colwise": ["mlp.fc"], "rowwise": "mlp.proj"}]


def tensor_parallel_block(data, rowwise: str = "attn.proj", sequence_parallel: bool = False):
    """Make blocks.0 tensor-parallel by hand, with the units the planner finds (or another row linear)."""
    units = copy.deepcopy(BLOCK_UNITS)
    units[0]["rowwise"] = rowwise
    data["layers"][2].update(strategy="tensor", tensor_parallel=units, sequence_parallel=sequence_parallel)


def test_validate_accepts_a_hand_made_tensor_parallel_layer(plans, tmp_path, capsys, gpt):
    assert [{"colwise": sorted(u.colwise), "rowwise": u.rowwise} for u in gpt[1].layers[2].tp_units] == BLOCK_UNITS
    path = write_plan(tmp_path, plans["dp2tp2"], lambda d: tensor_parallel_block(d, sequence_parallel=True))
    assert main(["validate", path, GPT, "--cluster", "cpu"]) == 0
    assert "blocks.0" in capsys.readouterr().out  # its prediction changed


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["model"].update(fingerprint="sha256:0000"), "model.fingerprint"),
    (lambda d: d["layers"][2].update(path="blocks.9"), "field 'layers'"),
    (lambda d: tensor_parallel_block(d, rowwise="attn.q"), "does not match the units"),
    (lambda d: tensor_parallel_block(d, rowwise="ln_1"), "not an nn.Linear"),
    (lambda d: tensor_parallel_block(d, rowwise="attn.nothing"), "has no module"),
    (lambda d: d["layers"][0].update(checkpoint="full"), "pick one of"),
    (lambda d: d["mesh"].update(dp=4), "world_size"),
    (lambda d: d["layers"][3].update(stage=3), "contiguous"),
    (lambda d: d["data_parallel"].update(kind="ddp", offload=True), "data_parallel.offload"),
])
def test_validate_refuses_inconsistent_plans(plans, tmp_path, capsys, edit, message):
    path = write_plan(tmp_path, plans["dp2tp2"], edit)
    assert main(["validate", path, GPT, "--cluster", "cpu"]) == 2
    assert message in capsys.readouterr().err


def test_validate_refuses_what_the_runtime_cannot_run(plans, tmp_path, capsys):
    # ddp compresses gradients to the compute dtype only: a reduce dtype of its own is refused before launch
    path = write_plan(tmp_path, plans["dp4"], lambda d: (d["data_parallel"].update(kind="ddp", offload=False),
                                                          d["precision"].update(reduce_dtype="bfloat16")))
    assert main(["validate", path, GPT, "--cluster", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "this runtime cannot run yet" in err and "compute dtype only" in err


def test_validate_refuses_a_plan_that_does_not_fit(plans, tmp_path, capsys):
    tiny = load_cluster("cpu").to_dict()
    tiny.update(name="tiny", device_memory_gib=0.001)
    cluster = tmp_path / "tiny.yaml"
    cluster.write_text(yaml.safe_dump(tiny))
    path = write_plan(tmp_path, plans["dp4"])
    assert main(["validate", path, GPT, "--cluster", str(cluster)]) == 2
    captured = capsys.readouterr()
    assert "re-costed on 'tiny'" in captured.out
    assert "exceeds" in captured.err and "checkpoint 'full'" in captured.err


# ---- diff ---------------------------------------------------------------------------------------------------
def test_diff_lists_changes_and_predicted_deltas(plans, tmp_path, capsys):
    a, b = plans["dp4"], plans["pp2"]
    fields = {f for f, _, _ in changed_fields(a, b)}
    assert {"mesh.pp", "mesh.dp", "pipeline.schedule", "layer blocks.0.stage"} <= fields
    pa, pb = write_plan(tmp_path, a, name="a.yaml"), write_plan(tmp_path, b, name="b.yaml")
    assert main(["diff", pa, pb]) == 0
    out = capsys.readouterr().out
    change = b.predicted.step_time_ms - a.predicted.step_time_ms
    assert f"{change:+.3f}" in out and f"{change / a.predicted.step_time_ms:+.1%}" in out
    assert main(["diff", pa, pa]) == 0
    assert "no changes" in capsys.readouterr().out


def test_diff_recosts_hand_edited_plans(plans, tmp_path, capsys):
    def checkpoint_blocks(data):
        for layer in data["layers"]:
            if layer["path"].startswith("blocks."):
                layer["checkpoint"] = "selective"

    pa = write_plan(tmp_path, plans["dp4"], name="a.yaml")
    pb = write_plan(tmp_path, plans["dp4"], checkpoint_blocks, name="b.yaml")
    assert main(["diff", pa, pb]) == 0
    assert "recompute" not in capsys.readouterr().out  # recorded predictions: the edit is not priced
    assert main(["diff", pa, pb, "--model", GPT, "--cluster", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "re-costed now" in out and "recompute" in out and "layer blocks.0.checkpoint" in out


# ---- progress -----------------------------------------------------------------------------------------------
class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("env, stream_cls, shown", [
    (None, io.StringIO, False), ("1", io.StringIO, True), (None, FakeTerminal, True), ("0", FakeTerminal, False)])
def test_progress_prints_only_on_a_terminal_or_when_forced(monkeypatch, env, stream_cls, shown):
    if env is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, env)
    stream = stream_cls()
    progress = Progress("plan", 3, stream=stream)
    for what in ("pp1 dp4", "pp2 dp2", "pp4 dp1"):
        progress.step(what)
    progress.finish("done")
    text = stream.getvalue()
    assert bool(text) == shown
    if shown:
        assert "plan [" in text and "3/3" in text and text.endswith("\n")


def test_search_progress_goes_to_stderr_and_changes_nothing(monkeypatch, capsys, plans):
    monkeypatch.setenv(ENV, "1")
    forced = plan(GPT, "cpu", 4, mesh=(1, 4, 1))
    captured = capsys.readouterr()
    assert "plan [" in captured.err and "plan [" not in captured.out
    assert forced.to_yaml() == plans["dp4"].to_yaml()
    monkeypatch.setenv(ENV, "0")
    plan(GPT, "cpu", 4, mesh=(1, 4, 1))
    assert capsys.readouterr().err == ""
    assert os.environ[ENV] == "0"


def test_show_says_when_tensor_parallel_ranks_repeat_the_same_work(plans):
    from test_parity import force_tensor_parallel

    replicated = copy.deepcopy(plans["dp2tp2"])
    for layer in replicated.layers:
        layer.strategy, layer.tensor_parallel, layer.sequence_parallel = "replicate", [], False
    replicated.validate("test")
    text = format_plan(replicated)
    assert "tp=2 but no layer is sharded over it" in text and "2 devices would train as fast" in text
    sharded = force_tensor_parallel(copy.deepcopy(replicated))
    sharded.validate("test")
    assert "repeat the same work" not in format_plan(sharded)
