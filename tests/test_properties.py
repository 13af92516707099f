"""Property tests (hypothesis) for the planner and the plan loader.

- plan() on random model shapes (MLPs and GPTs), world sizes, cluster presets, devices per node and memory
  limits either returns a plan whose predicted per-device memory is within the limit, or raises
  InfeasiblePlanError (planner/search.py, the documented "nothing fits" error); never anything else. The
  same inputs give the same YAML bytes.
- Plan.from_yaml on mutated plan text (bytes cut, inserted, replaced, lines swapped) and on structurally
  mutated plans (any value replaced by any YAML value) returns a Plan or raises PlanError; never anything else.
  The same for cluster profiles and ClusterError.

Example counts are small (the planner traces each random model, ~1 s) so CI stays fast; hypothesis shrinks
any failure to a small case and prints it.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from costmodel import ClusterError, load_cluster
from costmodel.cluster import Cluster
from planner.api import plan
from planner.plan import Plan
from planner.plan_schema import PlanError
from planner.search import InfeasiblePlanError

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = Path(tempfile.mkdtemp(prefix="meshplan-property-models-"))

MLP_TEMPLATE = """
import torch
import torch.nn.functional as F
from torch import nn
from meshplan import ModelSpec

def build():
    widths = {widths}
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])

    def make_batch(batch_size, step):
        x = torch.randn(batch_size, widths[0], generator=torch.Generator().manual_seed(step))
        return (x,), torch.zeros(batch_size, widths[-1])

    return ModelSpec(model=model, make_batch=make_batch, loss_fn=F.mse_loss, global_batch_size={batch})
"""

GPT_TEMPLATE = """
import importlib.util

_spec = importlib.util.spec_from_file_location("meshplan_property_gpt", {gpt_path!r})
_gpt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_gpt)

def build():
    return _gpt.build_gpt(vocab={vocab}, seq_len={seq_len}, hidden={hidden}, num_heads={heads},
                          num_layers={layers}, global_batch_size={batch})
"""


def write_model(text: str) -> str:
    """A MODEL file for `text` (named by its hash, so equal shapes share a file) -> `path:build`."""
    path = MODEL_DIR / f"model_{hashlib.sha256(text.encode()).hexdigest()[:16]}.py"
    if not path.exists():
        path.write_text(text)
    return f"{path}:build"


mlp_models = st.builds(
    lambda widths, batch: write_model(MLP_TEMPLATE.format(widths=widths, batch=batch)),
    st.lists(st.sampled_from([1, 3, 8, 16, 64, 200]), min_size=2, max_size=5), st.sampled_from([1, 2, 6, 8, 16]))
gpt_models = st.builds(
    lambda vocab, seq_len, heads, head_dim, layers, batch: write_model(GPT_TEMPLATE.format(
        gpt_path=str(ROOT / "examples" / "gpt.py"), vocab=vocab, seq_len=seq_len, hidden=heads * head_dim,
        heads=heads, layers=layers, batch=batch)),
    st.sampled_from([17, 64, 256]), st.sampled_from([4, 16, 32]), st.sampled_from([1, 2, 4]),
    st.sampled_from([4, 8, 16]), st.integers(1, 4), st.sampled_from([1, 4, 8, 12]))


def sized_cluster(preset: str, devices_per_node: int, limit_mib: float, host_link: bool) -> Cluster:
    """`preset` with `limit_mib` usable per device, and without a host link (no offload) unless `host_link`."""
    data = load_cluster(preset).to_dict()
    data.update(devices_per_node=devices_per_node, device_memory_gib=limit_mib / 1024, usable_memory_fraction=1.0)
    if not host_link:
        data.pop("host_link", None)
    return Cluster.from_dict(data, source=f"{preset} with {limit_mib} MiB")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(model=st.one_of(mlp_models, gpt_models), world_size=st.sampled_from([1, 2, 3, 4, 6, 8]),
       preset=st.sampled_from(["cpu", "a100-80g"]), devices_per_node=st.sampled_from([1, 2, 4, 8]),
       limit_mib=st.sampled_from([0.002, 0.02, 0.2, 2.0, 64.0]), host_link=st.booleans())
def test_plan_fits_in_memory_or_is_infeasible_and_is_deterministic(model, world_size, preset, devices_per_node,
                                                                   limit_mib, host_link):
    cluster = sized_cluster(preset, devices_per_node, limit_mib, host_link)
    try:
        result = plan(model, cluster, world_size)
    except InfeasiblePlanError as err:
        event("infeasible: " + str(err).split(":")[0])
        assert "no plan fits" in str(err) or "no pp x dp x tp mesh" in str(err)
        assert "To make" in str(err)  # and what would help
        return
    event("feasible")
    predicted = result.predicted
    assert predicted.memory_limit_mib == pytest.approx(limit_mib, abs=1e-3)
    assert predicted.peak_memory_mib <= predicted.memory_limit_mib + 1e-3  # both rounded to 1e-3 MiB
    assert result.mesh.pp * result.mesh.dp * result.mesh.tp == world_size
    assert plan(model, cluster, world_size).to_yaml() == result.to_yaml()


@pytest.fixture(scope="module")
def plan_text() -> str:
    return plan(f"{ROOT}/examples/gpt.py:build_gpt", "cpu", 4, mesh=(2, 2, 1)).to_yaml()


def mutate_text(text: str, data: st.DataObject) -> str:
    """One random edit of the text: cut a slice, insert text, replace a character, swap or duplicate lines,
    or truncate; applied 1-3 times."""
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(["cut", "insert", "replace", "swap", "duplicate", "truncate"]))
        i = data.draw(st.integers(0, len(text)))
        if kind == "cut":
            text = text[:i] + text[i + data.draw(st.integers(1, 40)):]
        elif kind == "insert":
            text = text[:i] + data.draw(st.sampled_from(["-", ":", " ", "\n", "{", "[", "'", "!!python/object ", "&a ",
                                                         "*a", "\t", "0", "-1", "nan", "~", "? ", "%YAML 1.1\n",
                                                         "\x00", "é"]) | st.text(max_size=8)) + text[i:]
        elif kind == "replace" and text:
            i = min(i, len(text) - 1)
            text = text[:i] + data.draw(st.characters()) + text[i + 1:]
        elif kind in ("swap", "duplicate"):
            lines = text.split("\n")
            a, b = data.draw(st.integers(0, len(lines) - 1)), data.draw(st.integers(0, len(lines) - 1))
            if kind == "swap":
                lines[a], lines[b] = lines[b], lines[a]
            else:
                lines.insert(b, lines[a])
            text = "\n".join(lines)
        else:
            text = text[:i]
    return text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_plan_loader_only_raises_plan_error_on_mutated_text(plan_text, data):
    text = mutate_text(plan_text, data)
    try:
        Plan.from_yaml(text, "fuzzed.yaml")
    except PlanError:
        pass


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.text(max_size=8) | st.integers(-3, 3) | st.booleans() | st.none(), children, max_size=3),
    max_leaves=6)


def replace_random_value(node, data: st.DataObject):
    """Walk down a random path of `node` (dicts and lists) and replace, delete or add one entry there."""
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            return
        key = data.draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, (dict, list)) and child and data.draw(st.booleans()):
            node = child
            continue
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            node[key] = data.draw(yaml_values)
        elif action == "delete":
            del node[key]
        elif isinstance(node, dict):
            node[data.draw(st.text(max_size=8))] = data.draw(yaml_values)
        else:
            node.append(data.draw(yaml_values))
        return


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_plan_loader_only_raises_plan_error_on_mutated_values(plan_text, data):
    tree = yaml.safe_load(plan_text)
    for _ in range(data.draw(st.integers(1, 3))):
        replace_random_value(tree, data)
    try:
        loaded = Plan.from_yaml(yaml.safe_dump(tree), "fuzzed.yaml")
    except PlanError:
        return
    assert math.isfinite(loaded.predicted.peak_memory_mib) and loaded.world_size >= 1


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_cluster_loader_only_raises_cluster_error(data):
    text = (ROOT / "costmodel" / "presets" / "a100-80g.yaml").read_text()
    if data.draw(st.booleans()):
        text = mutate_text(text, data)
    else:
        tree = yaml.safe_load(text)
        replace_random_value(tree, data)
        text = yaml.safe_dump(tree)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cluster.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            load_cluster(path)
        except ClusterError:
            pass
