"""A one-line progress bar on stderr for long searches and calibrations.

Shown only when stderr is a terminal, or when forced with MESHPLAN_PROGRESS=1 (`--progress` on the command line
sets it); MESHPLAN_PROGRESS=0 silences it. It writes to stderr only, never to a plan or profile, and reads
nothing back, so it cannot change what is computed. Redraws are throttled (at most one per REDRAW_S, plus the
last) so a search over thousands of configurations does not spend its time printing.

It lives in costmodel, the package every other one may import, so the planner's search and calibrate share it.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

ENV = "MESHPLAN_PROGRESS"
REDRAW_S = 0.1
BAR_WIDTH = 30
LABEL_WIDTH = 60


def progress_enabled(stream: TextIO) -> bool:
    """MESHPLAN_PROGRESS=1 forces the bar on, =0 off; otherwise it shows when `stream` is a terminal."""
    forced = os.environ.get(ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return hasattr(stream, "isatty") and stream.isatty()


class Progress:
    """`title [#####.....] done/total what` redrawn in place; `step` advances it, `finish` ends the line."""

    def __init__(self, title: str, total: int, enabled: bool = True, stream: TextIO | None = None):
        self.stream = sys.stderr if stream is None else stream
        self.title, self.total, self.done = title, max(1, total), 0
        self.enabled = enabled and progress_enabled(self.stream)
        self._drawn_at = -float("inf")
        self._finished = False

    def step(self, what: str, count: int = 1) -> None:
        """Advance by `count` and say what is being tried now."""
        self.done = min(self.total, self.done + count)
        now = time.monotonic()
        if self.enabled and not self._finished and (now - self._drawn_at >= REDRAW_S or self.done == self.total):
            self._draw(what)
            self._drawn_at = now

    def finish(self, summary: str = "") -> None:
        """Draw the final state with `summary` and end the line; later calls do nothing."""
        if self.enabled and not self._finished:
            self._draw(summary)
            self.stream.write("\n")
            self.stream.flush()
        self._finished = True

    def _draw(self, what: str) -> None:
        filled = round(BAR_WIDTH * self.done / self.total)
        what = what if len(what) <= LABEL_WIDTH else what[:LABEL_WIDTH - 3] + "..."
        self.stream.write(f"\r{self.title} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {self.done}/{self.total} "
                          f"{what:<{LABEL_WIDTH}}")
        self.stream.flush()
