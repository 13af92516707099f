"""The bad-input corpus: every malformed or mismatched input ends in one clear message and exit status 2.

Cases come from tests/bad_inputs/: edits of a valid plan (plan_edits.yaml) and of the cpu cluster preset
(cluster_edits.yaml), raw files (truncated, binary, tabs, YAML tags that would build Python objects), files
generated here to be hostile (nested 20,000 deep, alias bombs, 9 MB, duplicate keys), MODEL functions that
cannot be planned (models.py, model_exits_on_import.py), plus command-line arguments out of range (below).
Every message is bounded (no case prints more than MAX_ERR_CHARS). Each runs the
real command line, `meshplan.cli.main(argv)`, in this process (fast; an uncaught exception fails the test) with
torchrun's launcher replaced by a trap, so a case passes only if it is refused before any rank starts. A sample
of every kind also runs as `python -m meshplan.cli` in a subprocess (exit status and stderr as a user sees
them), and a plan for 2 ranks started by torchrun on 1 rank shows the check each rank makes before training.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from costmodel import load_cluster
from meshplan.cli import main
from planner.api import plan

ROOT = Path(__file__).resolve().parents[1]
BAD = ROOT / "tests" / "bad_inputs"
MLP = "tests/models.py:build_mlp"
PWNED = "MESHPLAN_PWNED"
"""The file the YAML-tag cases try to create through os.system / subprocess: it must never appear."""


MAX_ERR_CHARS = 4500
"""No refusal prints more than this (the CLI cuts messages at 4000 characters)."""


@dataclass
class Case:
    name: str
    argv: list[str]
    """Arguments after `meshplan`; {plan}, {cluster}, {raw} and {tmp} are filled in by `materialize`."""
    expect: list[str]
    plan_edit: dict | None = None
    cluster_edit: dict | None = None
    files: list[str] = field(default_factory=list)
    raw: Callable[[str], str] | None = None
    """Writes {raw}: a function of the valid plan's YAML text returning the file's content."""


def _alias_bomb(levels: int = 9) -> str:
    """`a: [x * 9]`, `b: [*a * 9]`, ...: 9**levels nodes once expanded, a few hundred bytes on disk."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def _set_field(text: str, path: tuple, value) -> str:
    data = yaml.safe_load(text)
    node = data
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return yaml.safe_dump(data, sort_keys=False)


GENERATED = {
    "plan_nested_20000_deep": (lambda base: "mesh: " + "[" * 20000 + "]" * 20000 + "\n",
                               ["not valid YAML", "nested more than 64 levels deep"]),
    "plan_alias_bomb": (lambda base: _alias_bomb(), ["not valid YAML", "expand to more than 1,000,000 nodes"]),
    "plan_recursive_alias": (lambda base: "mesh: &m {pp: *m}\n", ["not valid YAML", "recursive alias"]),
    "plan_9_mb": (lambda base: base + "# padding\n" * (9 * 2**20 // 10), ["larger than the 8,388,608 bytes",
                                                                          "right file"]),
    "plan_duplicate_pipeline_key": (lambda base: base + "pipeline: {schedule: none, num_microbatches: 2}\n",
                                    ["not valid YAML", "found duplicate key 'pipeline'", "keep one of them"]),
    "plan_100_kb_value": (lambda base: _set_field(base, ("mesh", "tp"), "t" * 100_000),
                          ["'mesh.tp' must be an integer", "99,922 more characters"]),
    "plan_many_aliases": (lambda base: "x: &x 1\ny: [" + ", ".join(["*x"] * 1500) + "]\n",
                          ["more than 1000 aliases"]),
}
EXECUTE_TOO = {"plan_alias_bomb", "plan_duplicate_pipeline_key", "cluster_alias_bomb", "cluster_duplicate_key"}
"""Generated files also given to `execute` (the same loader; the rest only through show / plan)."""
GENERATED_CLUSTERS = {
    "cluster_alias_bomb": (lambda base: _alias_bomb(), ["not valid YAML", "alias bomb"]),
    "cluster_nested_20000_deep": (lambda base: "name: " + "{a: " * 20000 + "1" + "}" * 20000 + "\n",
                                  ["nested more than 64 levels deep"]),
    "cluster_duplicate_key": (lambda base: yaml.safe_dump(load_cluster("cpu").to_dict()) + "backend: gloo\n",
                              ["found duplicate key 'backend'"]),
    "cluster_9_mb": (lambda base: "#" * (9 * 2**20) + "\n", ["larger than the 8,388,608 bytes"]),
}


def _edit(data, case: dict):
    """Apply a case's `set` / `delete` (dotted paths, numbers index lists) to YAML data in place."""
    def walk(path: str):
        *parents, last = path.split(".")
        node = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node, int(last) if isinstance(node, list) else last

    for path, value in case.get("set", {}).items():
        node, key = walk(path)
        node[key] = value
    for path in case.get("delete", []):
        node, key = walk(path)
        del node[key]
    return data


def _cases() -> list[Case]:
    cases = []
    for spec in yaml.safe_load((BAD / "plan_edits.yaml").read_text()):
        command = spec.get("command", "show")
        argv = [command, "{plan}", *spec.get("args", [])] + (["--steps", "2"] if command == "execute" else [])
        cases.append(Case(f"plan-{spec['name']}", argv, spec["expect"], plan_edit=spec))
    for spec in yaml.safe_load((BAD / "cluster_edits.yaml").read_text()):
        cases.append(Case(f"cluster-{spec['name']}", ["plan", MLP, "--cluster", "{cluster}", "--world-size", "2",
                                                      "--out", "{tmp}/out.yaml"], spec["expect"], cluster_edit=spec))
    raw_plans = {
        "plan_truncated.yaml": ["plan_truncated.yaml", "missing field 'world_size'"],
        "plan_truncated_in_quote.yaml": ["not valid YAML", "unexpected end of stream"],
        "plan_python_object.yaml": ["not valid YAML", "python/object/apply:os.system"],
        "plan_python_object_nested.yaml": ["not valid YAML", "python/object/new:subprocess.Popen"],
        "plan_top_level_list.yaml": ["must be a YAML mapping at the top level, got list"],
        "plan_empty.yaml": ["must be a YAML mapping at the top level, got NoneType"],
        "plan_tabs.yaml": ["not valid YAML", "tab"],
        "plan_binary.yaml": ["not a text (UTF-8) file"],
        "no_such_plan.yaml": ["cannot read plan file", "No such file"],
    }
    for name, expect in raw_plans.items():
        cases.append(Case(f"file-{name}", ["show", str(BAD / name)], expect))
        cases.append(Case(f"execute-{name}", ["execute", str(BAD / name)], expect))
    raw_clusters = {
        "cluster_python_tag.yaml": ["not valid YAML (or uses a tag safe_load refuses)", "python/object/apply"],
        "cluster_truncated.yaml": ["not valid YAML", "cluster_truncated.yaml"],
        "plan_binary.yaml": ["not a text (UTF-8) file"],
    }
    for name, expect in raw_clusters.items():
        cases.append(Case(f"file-{name}-as-cluster", ["plan", MLP, "--cluster", str(BAD / name), "--world-size",
                                                       "2", "--out", "{tmp}/out.yaml"], expect))
    for name, (make, expect) in GENERATED.items():
        cases.append(Case(f"generated-{name}", ["show", "{raw}"], expect, raw=make))
        if name in EXECUTE_TOO:
            cases.append(Case(f"generated-execute-{name}", ["execute", "{raw}"], expect, raw=make))
    for name, (make, expect) in GENERATED_CLUSTERS.items():
        cases.append(Case(f"generated-{name}", ["plan", MLP, "--cluster", "{raw}", "--world-size", "2", "--out",
                                                "{tmp}/out.yaml"], expect, raw=make))
        if name in EXECUTE_TOO:
            cases.append(Case(f"generated-execute-{name}", ["execute", "{plan}", "--cluster", "{raw}"], expect,
                              raw=make, plan_edit={}))
    models = {
        "build_data_dependent": ["tracing the training step failed", "models.py:27", "data-dependent"],
        "build_shape_mismatch": ["tracing the training step failed", "[8, 8] X [16, 4]"],
        "build_not_a_spec": ["must return planner.ModelSpec, got Linear"],
        "build_raises": ["build_raises() raised RuntimeError", "model.json not found"],
        "build_zero_batch": ["ModelSpec.global_batch_size must be a positive integer, got 0"],
        "build_needs_arguments": ["missing 1 required positional argument: 'hidden'"],
        "build_missing": ["has no function 'build_missing'"],
        "build_make_batch_dict": ["make_batch(8, 0) returned dict", "must return (inputs, targets)"],
        "build_make_batch_raises": ["make_batch(8, 0) raised KeyError", "'input_ids'", "fix the MODEL's make_batch"],
        "build_make_batch_tensor": ["make_batch(8, 0) returned Tensor", "must return (inputs, targets)"],
        "build_calls_exit": ["build_calls_exit()", "called sys.exit(3)", "without exiting"],
    }
    for function, expect in models.items():
        cases.append(Case(f"model-{function}", ["plan", f"tests/bad_inputs/models.py:{function}", "--cluster", "cpu",
                                                "--world-size", "2", "--out", "{tmp}/out.yaml"], expect))
    cases.append(Case("model-exits-on-import", ["plan", "tests/bad_inputs/model_exits_on_import.py:build",
                                                 "--cluster", "cpu", "--world-size", "2", "--out", "{tmp}/out.yaml"],
                      ["importing", "model_exits_on_import.py failed", "called sys.exit(0)"]))
    plan_args = ["plan", MLP, "--cluster", "cpu", "--out", "{tmp}/out.yaml"]
    arguments = {
        "world_size_zero": (plan_args + ["--world-size", "0"], ["--world-size", "positive integer, got 0"]),
        "world_size_word": (plan_args + ["--world-size", "two"], ["--world-size", "got 'two'"]),
        "world_size_mesh_mismatch": (plan_args + ["--world-size", "2", "--mesh", "1x2x2"],
                                     ["has 4 ranks but world size is 2", "--world-size 4"]),
        "mesh_zero": (plan_args + ["--world-size", "2", "--mesh", "0x2"], ["--mesh", "positive sizes"]),
        "param_dtype_int8": (plan_args + ["--world-size", "2", "--param-dtype", "int8"],
                             ["--param-dtype", "invalid choice: 'int8'"]),
        "cluster_unknown_preset": (plan_args + ["--world-size", "2", "--cluster", "a100-81g"],
                                   ["unknown cluster preset 'a100-81g'", "a100-80g"]),
        "steps_zero": (["execute", "{plan}", "--steps", "0"], ["--steps", "positive integer, got 0"]),
        "steps_negative": (["execute", "{plan}", "--steps", "-3"], ["--steps", "positive integer, got -3"]),
        "checkpoint_every_zero": (["execute", "{plan}", "--checkpoint-dir", "{tmp}/c", "--checkpoint-every", "0"],
                                  ["--checkpoint-every", "got 0"]),
        "max_restarts_negative": (["execute", "{plan}", "--max-restarts", "-1"], ["--max-restarts", ">= 0, got -1"]),
        "timeout_zero": (["execute", "{plan}", "--timeout-s", "0"], ["--timeout-s", "seconds > 0, got '0'"]),
        "timeout_nan": (["execute", "{plan}", "--timeout-s", "nan"], ["--timeout-s", "got 'nan'"]),
        "cluster_check_unknown": (["execute", "{plan}", "--cluster", "tpu-v9"], ["--cluster", "unknown cluster "
                                                                                 "preset 'tpu-v9'"]),
        "out_in_missing_folder": (["plan", MLP, "--cluster", "cpu", "--world-size", "2", "--out",
                                   "{tmp}/no/such/folder/out.yaml"], ["No such file or directory", "no/such/folder",
                                                                      "check the path"]),
        "timeline_in_missing_folder": (["show", "{plan}", "--timeline", "{tmp}/missing/t.png"],
                                       ["No such file or directory", "missing/t.png", "check the path"]),
        "timeline_as_text_file": (["show", "{plan}", "--timeline", "{tmp}/t.txt"],
                                  ["--timeline", "t.txt", "must end in one of .png"]),
        "out_is_a_folder": (["plan", MLP, "--cluster", "cpu", "--world-size", "2", "--out", "{tmp}"],
                            ["--out", "is a folder", "give a file path"]),
        "world_size_a_billion": (plan_args + ["--world-size", "1000000000"], ["--world-size", "at most 1,048,576"]),
        "world_size_huge_text": (plan_args + ["--world-size", "9" * 5000], ["--world-size", "positive integer"]),
        "calibrate_out_in_missing_folder": (["calibrate", "--quick", "--out", "{tmp}/no/such/cluster.yaml"],
                                            ["--out", "does not exist", "no/such"]),
        "diff_model_without_cluster": (["diff", "{plan}", "{plan}", "--model", MLP],
                                       ["give --model and --cluster together"]),
        "validate_against_another_model": (["validate", "{plan}", "tests/models.py:build_reused_linear", "--cluster",
                                            "cpu"], ["model.fingerprint", "re-run `meshplan plan`"]),
        "steps_huge_word": (["execute", "{plan}", "--steps", "x" * 10000], ["--steps", "positive integer"]),
    }
    for name, (argv, expect) in arguments.items():
        cases.append(Case(f"argument-{name}", argv, expect, plan_edit={}))
    return cases


CASES = _cases()
SUBPROCESS_SAMPLE = ["plan-tp_as_word", "plan-fingerprint_of_another_model", "plan-plan_for_another_cluster",
                     "file-plan_python_object.yaml", "file-plan_binary.yaml", "cluster-memory_negative",
                     "model-build_data_dependent", "argument-steps_zero"]


@pytest.fixture(scope="module")
def base_plan_yaml() -> str:
    """A valid plan the edits start from: the MLP of tests/models.py on 2 cpu ranks, data parallel."""
    return plan(MLP, "cpu", 2, mesh=(1, 2, 1)).to_yaml()


def materialize(case: Case, base_plan_yaml: str, tmp: Path) -> list[str]:
    """Write the case's plan and cluster files into `tmp` and return its argv with the placeholders filled."""
    plan_path, cluster_path, raw_path = tmp / "plan.yaml", tmp / "cluster.yaml", tmp / "raw.yaml"
    if case.raw is not None:
        raw_path.write_text(case.raw(base_plan_yaml))
    if case.plan_edit is not None:
        data = _edit(yaml.safe_load(base_plan_yaml), case.plan_edit)
        if "cluster_preset" in case.plan_edit:
            data["cluster"] = load_cluster(case.plan_edit["cluster_preset"]).for_world_size(2).to_dict()
        plan_path.write_text(yaml.safe_dump(data, sort_keys=False))
    if case.cluster_edit is not None:
        cluster_path.write_text(yaml.safe_dump(_edit(load_cluster("cpu").to_dict(), case.cluster_edit)))
    return [arg.format(plan=plan_path, cluster=cluster_path, tmp=tmp, raw=raw_path) for arg in case.argv]


def test_the_corpus_is_large_and_names_are_unique():
    assert len(CASES) >= 60 and len({c.name for c in CASES}) == len(CASES)
    assert set(SUBPROCESS_SAMPLE) <= {c.name for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_with_a_clear_message(case, base_plan_yaml, tmp_path, monkeypatch, capsys):
    import runtime.execute

    def no_launch(*args, **kwargs):
        raise AssertionError(f"{case.name}: torchrun was launched; the input should have been refused before")

    monkeypatch.setattr(runtime.execute, "launch", no_launch)
    monkeypatch.chdir(ROOT)
    argv = materialize(case, base_plan_yaml, tmp_path)
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's own refusals
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2, (argv, err[:3000])
    assert "Traceback" not in err and "internal error" not in err
    assert len(err) < MAX_ERR_CHARS, err[:3000]
    for text in case.expect:
        assert text in err, f"{text!r} not in the message:\n{err}"
    assert not (tmp_path / "out.yaml").exists()
    assert not Path(f"{tmp_path}.tmp").exists() and not list(tmp_path.glob("*.tmp"))  # `plan --out DIR` leftovers
    assert not (ROOT / PWNED).exists() and not (tmp_path / PWNED).exists()


def test_sample_through_the_installed_command_line(base_plan_yaml, tmp_path):
    """The same cases as a user runs them, `python -m meshplan.cli ...` in a subprocess: status 2 and no
    traceback on stderr. (Four at a time: each start-up imports torch.)"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def run(case: Case):
        folder = tmp_path / case.name
        folder.mkdir()
        argv = materialize(case, base_plan_yaml, folder)
        return case, subprocess.run([sys.executable, "-m", "meshplan.cli", *argv], cwd=ROOT, env=env,
                                    capture_output=True, text=True, timeout=300)

    sample = [c for c in CASES if c.name in SUBPROCESS_SAMPLE]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, sample))
    for case, done in results:
        assert done.returncode == 2, (case.name, done.stderr[-2000:])
        assert "Traceback" not in done.stderr, (case.name, done.stderr[-2000:])
        for text in case.expect:
            assert text in done.stderr, (case.name, text, done.stderr[-2000:])
    assert not (ROOT / PWNED).exists()


def run_by_hand_with_torchrun(plan_file: Path, ranks: int) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node=RANKS -m meshplan.cli execute PLAN`, as a person starts it (no `execute` checks
    before the launch)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={ranks}", "-m", "meshplan.cli", "execute", str(plan_file), "--steps",
                           "1"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=300)


def test_each_rank_refuses_a_plan_for_another_world_size(base_plan_yaml, tmp_path):
    """Started on 1 rank, a plan for 2 ranks stops in the rank before it joins a process group or builds the
    model: status 2 from the rank, the mismatch and the fix in its message."""
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(base_plan_yaml)
    done = run_by_hand_with_torchrun(plan_file, 1)
    assert done.returncode != 0
    assert "meshplan execute: error: the plan is for world size 2 but 1 ranks were started" in done.stderr
    assert "--nproc-per-node=2" in done.stderr and "exitcode  : 2" in done.stderr
    assert "ran 1 steps" not in done.stdout


def test_each_rank_refuses_a_plan_for_another_model_when_started_by_hand(tmp_path):
    edited = plan(MLP, "cpu", 1)
    edited.model.fingerprint = "sha256:0000000000000000"
    plan_file = tmp_path / "plan.yaml"
    edited.save(plan_file)
    done = run_by_hand_with_torchrun(plan_file, 1)
    assert done.returncode != 0
    assert "meshplan execute: error: the plan was made for a different model" in done.stderr
    assert "exitcode  : 2" in done.stderr and "ran 1 steps" not in done.stdout
