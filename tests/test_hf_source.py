"""`meshplan plan hf:PATH`: Hugging Face configs written by these tests (Llama, Qwen2, Mistral, GPT-2, BERT, ViT,
tiny; and a Llama-3-8B-shaped one) plan with no Python from the user, and the plan's recorded source rebuilds the
same model for `execute` (planner/hf_source.py). Nothing is downloaded and no weight file exists.

Cheap on purpose: the tiny configs plan in-process and take one real training step on CPU from the rebuilt
source; one of them (Qwen2) runs `meshplan execute` on 4 gloo ranks end to end.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from meshplan.cli import main
from planner.api import plan
from planner.hf_source import hf_source
from planner.model_spec import load_model_spec
from planner.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
TINY_TEXT = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "max_position_embeddings": 64}
CONFIGS = {
    "llama": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_key_value_heads": 2,
              "tie_word_embeddings": False, **TINY_TEXT},
    "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "num_key_value_heads": 2,
              "tie_word_embeddings": False, **TINY_TEXT},
    "mistral": {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "num_key_value_heads": 2,
                "sliding_window": None, "tie_word_embeddings": False, **TINY_TEXT},
    "gpt2": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 128, "n_positions": 64,
             "n_embd": 64, "n_layer": 2, "n_head": 4, "bos_token_id": 0, "eos_token_id": 0},
    "bert": {"model_type": "bert", "architectures": ["BertForMaskedLM"], **TINY_TEXT},
    "vit": {"model_type": "vit", "architectures": ["ViTForImageClassification"], "image_size": 16, "patch_size": 4,
            "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
            "num_labels": 4},
}
LLAMA3_8B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
             "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "max_position_embeddings": 8192, "rope_theta": 500000.0,
             "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def write_config(folder: Path, fields: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(fields))
    return folder / "config.json"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tiny_config_plans_and_its_recorded_source_trains(tmp_path, name):
    """Plan for 4 CPU ranks from the config alone; the recorded source rebuilds the model (random init, real
    tensors) and an AdamW step on its synthetic batch lowers the loss on that batch."""
    config = write_config(tmp_path / name, CONFIGS[name])
    source = hf_source(str(config.parent), seq_len=None if name == "vit" else 16, global_batch=8)
    result = plan(source, "cpu", 4)
    assert result.model.source == source and result.world_size == 4
    assert result.model.num_parameters > 10_000
    spec = load_model_spec(Plan.from_yaml(result.to_yaml()).model.source, device="cpu")
    torch.manual_seed(0)
    inputs, targets = spec.make_batch(8, 0)
    optimizer = torch.optim.AdamW(spec.model.parameters(), lr=1e-2)
    losses = []
    for _ in range(2):
        loss = spec.loss_fn(spec.model(*inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[1] < losses[0], losses


def test_llama3_8b_shaped_config_plans_for_64_h100(tmp_path, capsys):
    """The real-size config through the CLI: 8.03e9 parameters on the meta device, planned for 64 H100."""
    config = write_config(tmp_path / "llama3-8b", LLAMA3_8B)
    out = tmp_path / "plan.yaml"
    assert main(["plan", f"hf:{config}", "--seq-len", "8192", "--global-batch", "64", "--cluster", "h100",
                 "--world-size", "64", "--out", str(out)]) == 0
    result = Plan.load(out)
    assert 8.0e9 < result.model.num_parameters < 8.1e9
    assert result.model.global_batch_size == 64 and result.world_size == 64
    assert result.predicted.peak_memory_mib <= result.predicted.memory_limit_mib
    assert "seq-len=8192" in result.model.source and "hf:" in capsys.readouterr().out


@pytest.mark.parametrize("fields, message", [
    ({"model_type": "no-such-model", "hidden_size": 8}, "transformers does not know model_type 'no-such-model'"),
    ({"hidden_size": 8}, 'no "model_type" field'),
])
def test_bad_configs_are_clear_errors(tmp_path, capsys, fields, message):
    config = write_config(tmp_path / "bad", fields)
    assert main(["plan", f"hf:{config}", "--seq-len", "8", "--cluster", "cpu", "--world-size", "1",
                 "--out", str(tmp_path / "p.yaml")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_config_and_misused_flags_exit_2(tmp_path, capsys):
    assert main(["plan", f"hf:{tmp_path}/absent", "--seq-len", "8", "--cluster", "cpu", "--world-size", "1"]) == 2
    assert "no config.json at" in capsys.readouterr().err
    assert main(["plan", f"{ROOT}/examples/gpt.py:build_gpt", "--seq-len", "8", "--cluster", "cpu",
                 "--world-size", "1"]) == 2
    assert "apply to hf: sources only" in capsys.readouterr().err
    config = write_config(tmp_path / "llama", CONFIGS["llama"])
    assert main(["plan", f"hf:{config}", "--cluster", "cpu", "--world-size", "1"]) == 2
    assert "needs a sequence length (--seq-len S)" in capsys.readouterr().err


def test_qwen2_config_executes_on_4_ranks(tmp_path, monkeypatch):
    """No Python from the user: plan a config.json with the CLI (in this process), then execute the plan from
    another folder on 4 gloo ranks; the relative config path resolves from the plan's folder."""
    write_config(tmp_path / "qwen2", CONFIGS["qwen2"])
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "hf:qwen2", "--seq-len", "16", "--cluster", "cpu", "--world-size", "4",
                 "--out", "plan.yaml"]) == 0
    run = [sys.executable, "-m", "meshplan.cli"]
    done = subprocess.run([*run, "execute", str(tmp_path / "plan.yaml"), "--steps", "2", "--report-json",
                           str(tmp_path / "report.json")], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["losses"]) == 2 and all(math.isfinite(v) for v in report["losses"])
