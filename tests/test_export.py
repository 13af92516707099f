"""`meshplan export --to torchtitan|megatron|deepspeed` (meshplan/export.py): each config is checked for what it
must say (degrees multiply to the world size, batch arithmetic, checkpointing, data-parallel flavour), and, where
the target installs, fed to the target's own parser: torchtitan's config classes through tyro with torchtitan's
registry (as its ConfigManager parses), DeepSpeed's `DeepSpeedConfig` (batch arithmetic, ZeRO stage), and
megatron-core's `TransformerConfig` (recompute and parallel sizes). None of them is a meshplan dependency: without
them those parser checks skip with the reason and the structural checks still run. Megatron-LM's own argument
parser (megatron/training/arguments.py) is not in the megatron-core package, so its arguments are checked
against megatron-core's TransformerConfig fields they set.

Plans are examples/gpt.py's on pinned meshes (no torchrun).
"""

from __future__ import annotations

import copy
import json
from dataclasses import field, make_dataclass
from pathlib import Path

import pytest
from test_cli_tools import with_schedule
from test_parity import force_tensor_parallel

from meshplan.cli import main
from meshplan.export import export_plan
from planner.api import plan
from planner.model_graph import build_model_graph
from planner.model_spec import load_model_spec
from planner.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
GPT = f"{ROOT}/examples/gpt.py:build_gpt"


@pytest.fixture(scope="module")
def gpt():
    spec = load_model_spec(GPT, device="meta")
    return spec, build_model_graph(spec)


@pytest.fixture(scope="module")
def plans(gpt) -> dict[str, Plan]:
    """dp2 x tp2 with every block tensor-parallel (the two blocks' checkpointing mixed), and pp2 x dp2 1F1B."""
    tp = force_tensor_parallel(plan(GPT, "cpu", 4, mesh=(1, 2, 2)))
    tp.layers[2].checkpoint, tp.layers[3].checkpoint = "full", "none"
    pp = with_schedule(plan(GPT, "cpu", 4, mesh=(2, 2, 1)), gpt, "1f1b", 1, 2)
    return {"tp": tp, "pp": pp}


def arguments(text: str) -> dict[str, str]:
    """`--name value` / `--flag` lines as a dict (flags map to '')."""
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        out[name] = value
    return out


def test_megatron_arguments_say_the_plan(plans):
    tp = export_plan(plans["tp"], "megatron")
    args = arguments(tp.text)
    assert args["--tensor-model-parallel-size"] == "2" and args["--pipeline-model-parallel-size"] == "1"
    assert int(args["--micro-batch-size"]) * 2 * plans["tp"].pipeline.num_microbatches == \
        int(args["--global-batch-size"]) == 8
    # the mixed checkpointing became the uniform, more memory-saving mode, said as a change
    assert args["--recompute-granularity"] == "full" and any("checkpointing" in c for c in tp.changes)
    assert all(tp.nearest.layers[i].checkpoint == "full" for i in (2, 3, 4, 5))
    pp = arguments(export_plan(plans["pp"], "megatron").text)
    assert pp["--pipeline-model-parallel-size"] == "2" and pp["--num-layers"] == "4"
    megatron = pytest.importorskip("megatron.core.transformer", reason="megatron-core is not installed")
    config = megatron.TransformerConfig(
        num_layers=int(args["--num-layers"]), hidden_size=64, num_attention_heads=4,
        tensor_model_parallel_size=int(args["--tensor-model-parallel-size"]),
        pipeline_model_parallel_size=int(args["--pipeline-model-parallel-size"]),
        sequence_parallel="--sequence-parallel" in args, recompute_granularity=args["--recompute-granularity"],
        recompute_method=args["--recompute-method"], recompute_num_layers=int(args["--recompute-num-layers"]))
    assert config.recompute_granularity == "full"


def test_deepspeed_json_says_the_plan(plans, monkeypatch):
    tp = copy.deepcopy(plans["tp"])
    tp.data_parallel.kind = "zero3"
    with pytest.raises(Exception, match="runs with ZeRO stages 0-2, not ZeRO-3"):
        export_plan(tp, "deepspeed")
    tp.data_parallel.kind = "zero2"
    config = json.loads(export_plan(tp, "deepspeed").text)
    dp = tp.mesh.dp
    assert config["zero_optimization"]["stage"] == {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}.get(
        tp.data_parallel.kind) and config["tensor_parallel"] == {"autotp_size": 2}
    assert config["train_batch_size"] == config["train_micro_batch_size_per_gpu"] * \
        config["gradient_accumulation_steps"] * dp
    ds = pytest.importorskip("deepspeed.runtime.config", reason="deepspeed is not installed")

    class DataParallel:  # DeepSpeed asks an `mpu` for the data-parallel size (without one it assumes 1 rank)
        def get_data_parallel_world_size(self):
            return dp

    # it reads the rank first and falls back to world size 1 without a process group: answer as rank 0 does
    monkeypatch.setattr(ds.dist, "get_rank", lambda *args, **kwargs: 0)
    parsed = ds.DeepSpeedConfig(config, mpu=DataParallel())
    assert parsed.train_batch_size == 8 and parsed.zero_optimization_stage == config["zero_optimization"]["stage"]


def test_deepspeed_refuses_a_pipeline(plans, tmp_path, capsys):
    plans["pp"].save(tmp_path / "pp.yaml")
    assert main(["export", str(tmp_path / "pp.yaml"), "--to", "deepspeed"]) == 2
    err = capsys.readouterr().err
    assert "cannot say a pipeline (pp=2)" in err and "Traceback" not in err


def test_torchtitan_overrides_parse_with_torchtitans_config_classes(plans):
    text = export_plan(plans["pp"], "torchtitan").text
    lines = text.splitlines()
    assert lines[-1] == "activation_checkpoint:none"
    args = arguments("\n".join(lines[:-1]))
    assert args["--parallelism.pipeline_parallel_degree"] == "2"
    assert args["--parallelism.pipeline_parallel_schedule"] == "1F1B"
    assert args["--parallelism.pipeline_parallel_layers_per_stage"] == "2"
    pytest.importorskip("tyro", reason="tyro (torchtitan's command-line parser) is not installed")
    configs = pytest.importorskip("torchtitan.config.configs", reason="torchtitan is not installed")
    import tyro
    from torchtitan.config.manager import custom_registry

    # the two sections of torchtitan's Trainer.Config these overrides set (real classes, not string annotations)
    Overrides = make_dataclass("Overrides", [
        ("training", configs.TrainingConfig, field(default_factory=configs.TrainingConfig)),
        ("parallelism", configs.ParallelismConfig, field(default_factory=configs.ParallelismConfig))])

    parsed = tyro.cli(Overrides, args=[t for line in lines[:-1] for t in line.split()], registry=custom_registry)
    assert (parsed.parallelism.pipeline_parallel_degree, parsed.parallelism.data_parallel_shard_degree) == (2, 2)
    assert parsed.parallelism.pipeline_parallel_microbatch_size == plans["pp"].micro_batch_size
    assert parsed.training.global_batch_size == 8 and parsed.parallelism.fsdp_reshard_after_forward == "never"


def test_export_prints_the_nearest_plans_recosted_prediction(plans, tmp_path, capsys):
    edited = copy.deepcopy(plans["tp"])
    edited.save(tmp_path / "tp.yaml")
    out = tmp_path / "megatron.args"
    assert main(["export", str(tmp_path / "tp.yaml"), "--to", "megatron", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.read_text().startswith("--tensor-model-parallel-size 2")
    assert "cannot say this plan exactly" in printed and "re-costed" in printed and "step time (ms)" in printed


def test_a_block_replicated_over_tp_is_refused(plans):
    edited = copy.deepcopy(plans["tp"])
    edited.layers[3].strategy, edited.layers[3].tensor_parallel = "replicate", []
    with pytest.raises(Exception, match="replicates 1 block"):
        export_plan(edited, "torchtitan")
