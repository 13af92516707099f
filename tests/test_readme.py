"""README.md stays true: the walkthrough's show output and YAML excerpt are what the commands produce today.

The blocks after `<!-- readme-check: show -->` and `<!-- readme-check: yaml -->` must appear line for line in
`meshplan show` of the quick start's plan and in its YAML, and the `diff` block's lines (some rows left out) in
`meshplan diff` of that plan against the walkthrough's edit; the quick-start and test commands are the ones CI
runs.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from meshplan.diff import format_diff
from meshplan.show import format_plan
from meshplan.validate import recost_file
from planner.api import plan

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def checked_block(name: str) -> list[str]:
    match = re.search(rf"<!-- readme-check: {name} -->\n```\w*\n(.*?)\n```", README, re.S)
    assert match, f"README.md has no block marked readme-check: {name}"
    return match.group(1).splitlines()


@pytest.fixture(scope="module")
def quick_start_plan():
    return plan("examples/gpt.py:build_gpt", "cpu", 4)


def test_walkthrough_show_output_is_current(quick_start_plan):
    assert checked_block("show") == format_plan(quick_start_plan).splitlines()


def test_walkthrough_yaml_excerpt_is_current(quick_start_plan):
    lines = quick_start_plan.to_yaml().splitlines()
    excerpt = [line for line in checked_block("yaml") if not line.startswith("#")]
    position = 0
    for line in excerpt:  # in the plan's order; ValueError names a line that is no longer produced
        position = lines.index(line, position) + 1


def test_walkthrough_diff_is_current(quick_start_plan):
    edited = copy.deepcopy(quick_start_plan)
    for layer in edited.layers:
        if layer.path in ("blocks.0", "blocks.1"):
            layer.checkpoint = "full"
    plans = [quick_start_plan, edited]
    for p in plans:
        p.predicted = recost_file(p, "examples/gpt.py:build_gpt", "cpu").prediction
    printed = format_diff(*plans, "plan.yaml", "edited.yaml", recosted=True).splitlines()
    position = 0
    for line in checked_block("diff"):  # in order; the README leaves unchanged rows out
        position = printed.index(line, position) + 1


def test_quick_start_and_test_commands_are_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = 'pip install torch==2.13.0 -e ".[test]" && ruff check . && pytest -q'
    assert test_command in README and test_command in ci
    assert "meshplan plan examples/gpt.py:build_gpt --cluster cpu --world-size 4 --out plan.yaml && " \
           "meshplan execute plan.yaml --steps 5" in README
    for path in re.findall(r"\((docs/[\w./-]+)\)", README):
        assert (ROOT / path).is_file(), path


def test_bring_your_own_model_commands_parse():
    """Every command of the "Bring your own model" block is one the `meshplan` parser accepts as written."""
    from meshplan.cli import build_parser

    commands = checked_block("commands")
    assert len(commands) >= 5
    parser = build_parser()
    for command in commands:
        words = command.split()
        assert words[0] == "meshplan", command
        parser.parse_args(words[1:])


def test_export_refusal_is_what_export_prints(quick_start_plan):
    """The "Export to your trainer" block is what `meshplan export --to megatron` says of the quick-start plan."""
    from meshplan.export import ExportError, export_plan

    with pytest.raises(ExportError) as refused:
        export_plan(quick_start_plan, "megatron")
    assert checked_block("export") == [f"meshplan export: error: {refused.value}"]
