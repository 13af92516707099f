"""Find the chain of layers a model runs through: the units that plans name and pipelines will cut.

For a GPT that is `wte, wpe, blocks.0 ... blocks.N-1, ln_f, head`. The main repeated stack is the
ModuleList/Sequential with the most children of one class; the chain is the root's children in the order
they first run, with every module on the way down to that stack replaced by its own children, and the stack
expanded into its blocks.
"""

from __future__ import annotations

from torch import nn


def repeated_stack_path(model: nn.Module) -> str | None:
    """Dotted path of the container holding the most same-class children (at least 2), or None."""
    best_path, best_count = None, 1
    for path, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        classes = [type(child).__name__ for child in module.children()]
        count = max((classes.count(c) for c in set(classes)), default=0)
        if count > best_count:
            best_path, best_count = path, count
    return best_path


def find_layer_chain(model: nn.Module, first_use: dict[str, int]) -> list[str]:
    """Module paths of the layer chain, in execution order.

    first_use maps a module path to the index of the first forward op it ran; modules that never ran are
    left out (they own no compute).
    """
    stack_path = repeated_stack_path(model)

    def ran(path: str) -> int | None:
        prefix = path + "."
        hits = [i for p, i in first_use.items() if p == path or p.startswith(prefix)]
        return min(hits) if hits else None

    def expand(prefix: str, module: nn.Module) -> list[str]:
        layers = []
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            on_stack_path = stack_path is not None and (stack_path == path or stack_path.startswith(path + "."))
            if on_stack_path or isinstance(child, (nn.ModuleList, nn.Sequential)):
                layers.extend(expand(path + ".", child))
            elif ran(path) is not None:
                layers.append(path)
        return layers

    layers = expand("", model)
    if not layers:
        return [""]
    return sorted(layers, key=lambda p: ran(p))
