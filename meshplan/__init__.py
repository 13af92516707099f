"""meshplan: plan how to train a PyTorch model across devices, write the plan as YAML, and run it.

    from meshplan import plan, execute
    p = plan("examples/gpt.py:build_gpt", cluster="cpu", world_size=4)
    report = execute(p, steps=5)
"""

from planner.model_spec import ModelSpec
from planner.plan import Plan

__all__ = ["ModelSpec", "Plan", "execute", "plan"]


def plan(*args, **kwargs) -> Plan:
    """See planner.api.plan (imported lazily: the solver stack is not needed to load a ModelSpec)."""
    from planner.api import plan as _plan

    return _plan(*args, **kwargs)


def execute(*args, **kwargs):
    """See runtime.execute.execute."""
    from runtime.execute import execute as _execute

    return _execute(*args, **kwargs)
