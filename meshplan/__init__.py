"""meshplan: plan how to train a PyTorch model across GPUs, write the plan as YAML, and run it.

    from meshplan import plan, execute
    p = plan("examples/gpt.py:build_gpt", cluster="cpu", world_size=4)
    report = execute(p, steps=5)
"""

from planner import ModelSpec

__all__ = ["ModelSpec"]
