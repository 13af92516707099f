"""Known-harmless torch warnings that every rank would print on every run, silenced by their exact message.

- torch 2.13's own pytree code (reached through DTensor / FSDP2 / torch.export while a rank builds its model)
  still builds `LeafSpec()` objects, a class torch 2.13 itself deprecates with a FutureWarning ("`isinstance(
  treespec, LeafSpec)` is deprecated"): nothing
  meshplan can change, and one copy per rank buries the run's report. Only that message is filtered, so any
  other FutureWarning still shows.
"""

from __future__ import annotations

import warnings

KNOWN_HARMLESS = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
)


def silence_known_torch_warnings() -> None:
    for category, message in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=message, category=category)
