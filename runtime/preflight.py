"""Checks that a plan fits the model, the machine, the cluster and the launch, made before any rank trains.

`execute` runs them before it starts torchrun (one clear PlanError instead of a failed job); each rank runs the
launch checks again before its first step, because a person may start the ranks with torchrun directly (with
another `--nproc-per-node`, on another machine). Every message names the mismatch and the fix.

What a plan records to check against (planner/plan.py): `model.fingerprint` (hash of the traced forward graph),
`world_size` and the mesh, and `cluster`, the whole profile it was costed on (device type, backend, devices per
node, number of nodes sized for the world size).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from costmodel import Cluster, ClusterError, load_cluster
from planner.model_graph import build_model_graph
from planner.model_spec import import_model_file, load_model_spec
from planner.plan import Plan
from planner.plan_schema import PlanError
from planner.recost import check_plan_describes_graph

ACCEPT_MODEL_CHANGE_ENV = "MESHPLAN_ACCEPT_MODEL_CHANGE"
"""Set to 1 (by `execute --accept-model-change`) to import a MODEL file whose sha256 differs from the plan's."""


def expected_model_sha256(plan: Plan, accept_model_change: bool = False) -> str | None:
    """The sha256 the MODEL file must have before it is imported; None when the user accepted a change."""
    if accept_model_change or os.environ.get(ACCEPT_MODEL_CHANGE_ENV) == "1":
        return None
    if not plan.model.source_sha256:
        raise PlanError(f"the plan records no model.source_sha256 for {plan.model.source} (it was written by an "
                        "older meshplan or by hand), so the file cannot be checked before it is imported. Re-run "
                        "`meshplan plan`, add `source_sha256: <sha256sum of the file>` under `model:`, or pass "
                        "--accept-model-change to import it unchecked")
    return plan.model.source_sha256


def import_checked_model(plan: Plan, plan_dir: Path | None, accept_model_change: bool = False) -> None:
    """Import the plan's MODEL file only if its bytes are the ones the plan was made from (the first import in a
    process is the one that runs the file's code; later loads reuse that module)."""
    import_model_file(plan.model.source, plan_dir, expected_model_sha256(plan, accept_model_change))


def check_plan_matches_model(plan: Plan, plan_dir: Path | None, accept_model_change: bool = False) -> None:
    """Refuse a plan whose model file or graph changed since planning (traced on the meta device, no weights)."""
    import_checked_model(plan, plan_dir, accept_model_change)
    spec = load_model_spec(plan.model.source, base_dir=plan_dir, device="meta")
    graph = build_model_graph(spec)
    fingerprint = graph.fingerprint
    if fingerprint != plan.model.fingerprint:
        raise PlanError(f"the plan was made for a different model: fingerprint {plan.model.fingerprint} in the "
                        f"plan, {fingerprint} for {plan.model.source} now. Re-run `meshplan plan`.")
    # what `meshplan validate` checks of the plan against the model: layer paths and order, tensor-parallel
    # units, heads divisible by tp (planner/recost.py)
    check_plan_describes_graph(plan, spec.model, graph, Cluster.from_dict(plan.cluster, source="the plan's cluster"))


def check_world_size(plan: Plan, world_size: int) -> None:
    """Refuse a launch of `world_size` ranks for a plan of another world size."""
    if world_size != plan.world_size:
        raise PlanError(f"the plan is for world size {plan.world_size} but {world_size} ranks were started; "
                        f"launch with --nproc-per-node={plan.world_size} (x nodes) or re-plan with "
                        f"--world-size {world_size}")


def check_machine_has_devices(plan: Plan, local_ranks: int) -> None:
    """Refuse a CUDA plan on a machine without (enough) GPUs for its `local_ranks` ranks on this node."""
    if plan.cluster.get("device_type") != "cuda":
        return
    name = plan.cluster.get("name")
    if not torch.cuda.is_available():
        raise PlanError(f"the plan targets CUDA devices ({name}) but this machine has none; plan for the 'cpu' "
                        "cluster (`meshplan plan ... --cluster cpu`) to run on CPU processes")
    if torch.cuda.device_count() < local_ranks:
        raise PlanError(f"the plan puts {local_ranks} ranks on this node of {name} but it has "
                        f"{torch.cuda.device_count()} GPUs; start fewer ranks per node or re-plan for this machine")


def check_single_node(plan: Plan) -> None:
    """`execute` starts torchrun on this host only: refuse a plan whose cluster spans several nodes."""
    nodes = plan.cluster.get("num_nodes", 1)
    if isinstance(nodes, int) and nodes > 1:
        raise PlanError(f"the plan spans {nodes} nodes of {plan.cluster.get('devices_per_node')} devices; "
                        "`meshplan execute` starts ranks on this host only. Start `torchrun --nnodes="
                        f"{nodes} --nproc-per-node=... -m meshplan.cli execute PLAN` on every node instead")


def check_plan_for_cluster(plan: Plan, cluster: str | Cluster) -> None:
    """Refuse a plan costed on another cluster profile than `cluster` (a preset name, a YAML path or a Cluster),
    naming the fields that differ."""
    try:
        expected = (cluster if isinstance(cluster, Cluster) else load_cluster(cluster))
        expected = expected.for_world_size(plan.world_size).to_dict()
    except ClusterError as err:
        raise PlanError(f"--cluster: {err}") from err
    differing = sorted(key for key in set(expected) | set(plan.cluster) if expected.get(key) != plan.cluster.get(key))
    if differing:
        shown = ", ".join(f"{key}: {plan.cluster.get(key)!r} in the plan, {expected.get(key)!r} in "
                          f"{expected['name']}" for key in differing[:4])
        raise PlanError(f"the plan was made for cluster {plan.cluster.get('name')!r}, not {expected['name']!r} "
                        f"({shown}{', ...' if len(differing) > 4 else ''}). Re-run `meshplan plan ... --cluster "
                        f"{cluster if isinstance(cluster, str) else expected['name']}`.")


def check_before_launch(plan: Plan, plan_dir: Path | None, cluster: str | Cluster | None = None,
                        accept_model_change: bool = False) -> None:
    """Everything `execute` can check on this host before it starts torchrun for `plan`."""
    if cluster is not None:
        check_plan_for_cluster(plan, cluster)
    check_single_node(plan)
    check_machine_has_devices(plan, plan.world_size)
    check_plan_matches_model(plan, plan_dir, accept_model_change)


def check_in_rank(plan: Plan) -> None:
    """What each torchrun rank checks from its environment before it joins the process group: the number of
    ranks started and this node's devices. (Cheap: no tracing; the fingerprint is checked by `execute` before
    launch, and by each rank only when it was started without `execute`.)"""
    check_world_size(plan, int(os.environ["WORLD_SIZE"]))
    check_machine_has_devices(plan, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
