"""plan(): search results, YAML round trip, determinism, and clear errors for broken plan files."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from costmodel import load_cluster
from planner.api import plan
from planner.plan import Plan
from planner.plan_schema import PlanError
from planner.search import InfeasiblePlanError

ROOT = Path(__file__).resolve().parents[1]
GPT = f"{ROOT}/examples/gpt.py:build_gpt"


@pytest.fixture(scope="module")
def gpt_plan() -> Plan:
    return plan(GPT, "cpu", 4)


@pytest.fixture(scope="module")
def flat_plan() -> Plan:
    """Pure data parallelism (pp = 1): the base the broken-plan cases edit."""
    return plan(GPT, "cpu", 4, mesh=(1, 4, 1))


def test_plan_is_consistent_and_fits(gpt_plan):
    assert gpt_plan.mesh.pp * gpt_plan.mesh.dp * gpt_plan.mesh.tp == 4
    assert len(gpt_plan.alternatives) >= 3
    assert [layer.path for layer in gpt_plan.layers][:3] == ["wte", "wpe", "blocks.0"]
    assert gpt_plan.predicted.peak_memory_mib <= gpt_plan.predicted.memory_limit_mib
    assert gpt_plan.predicted.step_time_ms > 0


def test_yaml_round_trip_and_determinism(gpt_plan, tmp_path):
    path = tmp_path / "plan.yaml"
    gpt_plan.save(path)
    assert Plan.load(path) == gpt_plan
    assert plan(GPT, "cpu", 4).to_yaml() == gpt_plan.to_yaml()


def test_memory_pressure_changes_the_plan():
    # slow links make tensor parallelism lose on time; a device with 60% of the memory the fastest tp4 plan
    # needs must trade time for memory: shard blocks, checkpoint or offload them, or run more micro-batches
    cluster = load_cluster("cpu").to_dict()
    slow = {**cluster, "intra_node": {"bandwidth_gb_per_s": 0.01, "latency_us": 10000}}
    roomy = plan(GPT, type(load_cluster("cpu")).from_dict(slow), 4, mesh=(1, 1, 4))
    assert all(layer.strategy == "replicate" and layer.checkpoint == "none" for layer in roomy.layers)
    limit_gib = 0.6 * roomy.predicted.peak_memory_mib / 1024
    tight = type(load_cluster("cpu")).from_dict({**slow, "device_memory_gib": limit_gib, "usable_memory_fraction": 1.0})
    forced = plan(GPT, tight, 4, mesh=(1, 1, 4))
    assert forced.predicted.peak_memory_mib <= forced.predicted.memory_limit_mib < roomy.predicted.peak_memory_mib
    assert forced.predicted.step_time_ms >= roomy.predicted.step_time_ms
    assert forced.pipeline.num_microbatches > 1 or any(
        layer.strategy in ("tensor", "vocab") or layer.checkpoint != "none" or layer.offload_activations
        for layer in forced.layers)


@pytest.mark.parametrize("limit_mib", [1.0, 1.5, 2.0, 3.0, 5.0])
def test_plans_never_exceed_the_memory_limit(limit_mib):
    cluster = load_cluster("cpu")
    small = type(cluster).from_dict({**cluster.to_dict(), "device_memory_gib": limit_mib / 1024,
                                     "usable_memory_fraction": 1.0})
    try:
        result = plan(GPT, small, 4)
    except InfeasiblePlanError as err:
        needed = float(str(err).split("needs ")[1].split(" MiB")[0].replace(",", ""))
        assert needed > limit_mib
        return
    assert result.predicted.peak_memory_mib <= limit_mib + 1e-6
    assert result.predicted.peak_memory_mib == pytest.approx(
        result.predicted.parameters_mib + result.predicted.gradients_mib + result.predicted.optimizer_states_mib
        + result.predicted.activations_mib + result.predicted.buffers_mib, abs=0.01)


def test_infeasible_says_how_much_memory_is_needed():
    cluster = load_cluster("cpu")
    tiny = type(cluster).from_dict({**cluster.to_dict(), "device_memory_gib": 0.0001})
    with pytest.raises(InfeasiblePlanError, match=r"needs [\d.,]+ MiB per device"):
        plan(GPT, tiny, 4)


def edit(gpt_plan, change) -> str:
    data = yaml.safe_load(gpt_plan.to_yaml())
    change(data)
    return yaml.safe_dump(data)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("mesh"), "missing field 'mesh'"),
    (lambda d: d.update(extra=1), "unknown field 'extra'"),
    (lambda d: d["mesh"].update(tp="two"), "field 'mesh.tp' must be an integer"),
    (lambda d: d["mesh"].update(dp=3), "world_size is 4"),
    (lambda d: d.update(schema_version=99), "schema_version"),
    (lambda d: d["layers"][0].update(strategy="magic"), r"layers\[0\] \(wte\).strategy"),
    (lambda d: d["layers"][0].update(strategy="tensor"), "no tensor_parallel units"),
    (lambda d: d["model"].update(num_parameters=True), "model.num_parameters"),
    (lambda d: d.update(layers=[]), "layers' is empty"),
    (lambda d: d["data_parallel"].update(kind="zero4"), "data_parallel.kind"),
    (lambda d: d["data_parallel"].update(replicate=3), "data_parallel.replicate"),
    (lambda d: d["data_parallel"].update(kind="ddp", offload=True), "offload needs kind 'zero3'"),
    (lambda d: d["pipeline"].update(schedule="1f1b"), "does not fit pp=1"),
    (lambda d: d["pipeline"].update(num_microbatches=3), "not divisible by"),
    (lambda d: d["layers"][-1].update(stage=1), "needs stages 0..0"),
    (lambda d: d["layers"][1].update(stage=2), "stages must be contiguous"),
    (lambda d: d["layers"][0].update(checkpoint="some"), r"layers\[0\] \(wte\).checkpoint"),
    (lambda d: d["precision"].update(param_dtype="int8"), "precision.param_dtype"),
])
def test_broken_plans_name_the_field(flat_plan, change, message):
    with pytest.raises(PlanError, match=message):
        Plan.from_yaml(edit(flat_plan, change), "plan.yaml")


def test_yaml_that_builds_python_objects_is_rejected():
    with pytest.raises(PlanError, match="not valid YAML"):
        Plan.from_yaml("!!python/object/apply:os.system ['echo hi']", "evil.yaml")


def test_cli_plan_show_and_user_errors(tmp_path):
    out = tmp_path / "plan.yaml"
    done = subprocess.run([sys.executable, "-m", "meshplan.cli", "plan", GPT, "--cluster", "cpu",
                           "--world-size", "4", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "predicted step time" in done.stdout and out.exists()
    shown = subprocess.run([sys.executable, "-m", "meshplan.cli", "show", str(out)], capture_output=True, text=True)
    assert "blocks.0" in shown.stdout and "alternatives" not in shown.stdout
    why = subprocess.run([sys.executable, "-m", "meshplan.cli", "show", "--why", str(out)], capture_output=True,
                         text=True)
    assert why.stdout.count(" ms ") >= 3 and "step time" in why.stdout
    out.write_text(out.read_text().replace("world_size: 4", "world_size: 3"))
    bad = subprocess.run([sys.executable, "-m", "meshplan.cli", "show", str(out)], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "world_size is 3" in bad.stderr and "Traceback" not in bad.stderr
