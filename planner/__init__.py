"""meshplan's planner: capture a model, cost it, search the parallel plan, and read/write plan YAML."""

from planner.model_spec import ModelSpec, ModelSpecError, load_model_spec

__all__ = ["ModelSpec", "ModelSpecError", "load_model_spec"]
