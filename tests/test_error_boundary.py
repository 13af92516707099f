"""The CLI's error boundary and the model-file checks, run in this process through `meshplan.cli.main`.

- an unforeseen exception: exit 1, one line naming it and a log file holding the traceback; `--debug` raises it;
- a closed stdout (`meshplan show plan.yaml | head -1`): exit 0 and nothing on stderr;
- a MODEL file edited after planning: `execute` refuses it before its code runs (a marker it would write stays
  absent); `--accept-model-change` imports it knowingly and the run goes on to the launch;
- tensor parallelism over 3 attention heads: `validate` and `execute` refuse it before any rank starts.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

import meshplan.cli
from meshplan.cli import main
from planner.api import plan
from planner.plan import TensorParallelUnitPlan

ROOT = Path(__file__).resolve().parents[1]
MLP = f"{ROOT}/tests/models.py:build_mlp"

MODEL_FILE = '''
import torch
import torch.nn.functional as F
from torch import nn

from meshplan import ModelSpec


def _batch(batch_size, step):
    x = torch.randn(batch_size, 8, generator=torch.Generator().manual_seed(step))
    return (x,), x[:, :4]


def build():
    return ModelSpec(model=nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)), make_batch=_batch, loss_fn=F.mse_loss,
                     global_batch_size=8)
'''


class LaunchReached(Exception):
    """Raised by the trapped launcher: every check before torchrun passed."""


@pytest.fixture
def trapped_launch(monkeypatch):
    import runtime.execute

    def launch(*args, **kwargs):
        raise LaunchReached

    monkeypatch.setattr(runtime.execute, "launch", launch)


def test_an_unforeseen_error_is_one_line_and_a_log_file(tmp_path, monkeypatch, capsys):
    plan_file = tmp_path / "plan.yaml"
    plan(MLP, "cpu", 1).save(plan_file)

    def broken(*args, **kwargs):
        raise TypeError("an internal bug")

    monkeypatch.setattr(meshplan.cli, "format_plan", broken)
    assert main(["show", str(plan_file)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "meshplan show: internal error: TypeError: an internal bug" in err and "--debug" in err
    log = Path(err.split("the traceback is in ")[1].split(";")[0])
    assert "Traceback" in log.read_text() and "an internal bug" in log.read_text()
    log.unlink()
    with pytest.raises(TypeError, match="an internal bug"):
        main(["--debug", "show", str(plan_file)])


def test_a_closed_stdout_ends_quietly(tmp_path, monkeypatch, capsys):
    plan_file = tmp_path / "plan.yaml"
    plan(MLP, "cpu", 1).save(plan_file)

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            raise io.UnsupportedOperation("no file descriptor")

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert main(["show", str(plan_file)]) == 0
    assert capsys.readouterr().err == ""


def test_a_model_file_changed_after_planning_is_not_imported(tmp_path, trapped_launch, capsys):
    model_file = tmp_path / "model.py"
    model_file.write_text(MODEL_FILE)
    plan_file = tmp_path / "plan.yaml"
    plan(f"{model_file}:build", "cpu", 1).save(plan_file)
    marker = tmp_path / "IMPORTED"
    model_file.write_text(MODEL_FILE + f"\nopen({str(marker)!r}, 'w').close()\n")
    # a new file name: this process imported the planned bytes under the old name's module already
    renamed = tmp_path / "model2.py"
    model_file.rename(renamed)
    plan_file.write_text(plan_file.read_text().replace("/model.py:", "/model2.py:"))

    assert main(["execute", str(plan_file), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "changed since the plan was made" in err and "was not imported" in err, err
    assert "--accept-model-change" in err and not marker.exists()

    with pytest.raises(LaunchReached):  # accepted knowingly: imported, fingerprint still checked, then launched
        main(["--debug", "execute", str(plan_file), "--steps", "1", "--accept-model-change"])
    assert marker.exists()


def test_a_model_file_edited_after_its_import_in_this_process_is_refused(tmp_path, trapped_launch, capsys):
    """The launcher process imported the planned file; the file on disk (what the ranks would import) changed."""
    model_file = tmp_path / "model.py"
    model_file.write_text(MODEL_FILE)
    plan_file = tmp_path / "plan.yaml"
    plan(f"{model_file}:build", "cpu", 1).save(plan_file)
    model_file.write_text(MODEL_FILE + "\n# edited\n")
    assert main(["execute", str(plan_file), "--steps", "1"]) == 2
    assert "changed since the plan was made" in capsys.readouterr().err


def test_tensor_parallel_over_three_heads_is_refused_before_launch(tmp_path, trapped_launch, capsys):
    source = f"{ROOT}/tests/bad_inputs/models.py:build_three_heads"
    edited = plan(source, "cpu", 2, mesh=(1, 1, 2))
    from planner.model_graph import build_model_graph
    from planner.model_spec import load_model_spec

    units = {layer.path: layer.tp_units for layer in build_model_graph(load_model_spec(source, device="meta")).layers}
    for layer in edited.layers:
        if layer.path.startswith("blocks.") and units[layer.path]:
            layer.strategy = "tensor"
            layer.tensor_parallel = [TensorParallelUnitPlan(list(u.colwise), u.rowwise) for u in units[layer.path]]
    plan_file = tmp_path / "plan.yaml"
    edited.save(plan_file)
    for argv in (["validate", str(plan_file), source, "--cluster", "cpu"], ["execute", str(plan_file)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "attn.num_heads is 3, which 2 does not divide" in err and "whole heads" in err, err
