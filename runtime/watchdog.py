"""Hang detection: a thread per rank that ends the job, naming the rank and step, when training stops moving.

A rank that stops answering (stuck in its own code, killed without its peers noticing, or skipping a collective
its peers wait in) makes every other rank wait inside a collective; gloo waits 30 minutes by default and NCCL
10, and then fails with an error that says neither which rank nor which step. So the training loop tells its
`Watchdog` each (step, phase) it enters; the watchdog thread publishes that progress, with a heartbeat, to the
process group's store (the TCPStore torchrun's rendezvous set up, reachable from every rank) and, when one
phase has lasted `timeout_s`, reads every rank's progress, prints which rank is behind at which step and phase,
and exits this process with HANG_EXIT_STATUS. torchrun then stops the other ranks (or restarts the group from
the latest checkpoint with --max-restarts).

Blind spot: a rank blocked in C++ code that holds the GIL cannot run its watchdog thread; its peers' watchdogs
still fire and name it, because its heartbeat goes stale. The process group's own timeout is set above
`timeout_s` as a backstop (runtime/execute.py).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass

import torch.distributed as dist

HANG_EXIT_STATUS = 3
"""Exit status of a rank whose watchdog fired (torchrun reports it per rank)."""
SETUP_STEP = -1
"""The step recorded while the model is built and a checkpoint loaded, before step 0."""
PHASE_ORDER = ("build", "resume", "data", "barrier", "step", "loss all-reduce", "checkpoint", "report")
"""Phases in the order a rank passes them within a step (build and resume come once, before step 0)."""
_KEY = "meshplan/progress/{rank}"


@dataclass
class Progress:
    """Where one rank is: the step, the phase within it, and when its watchdog last published this."""

    rank: int
    step: int
    phase: str
    heartbeat_age_s: float = 0.0

    def position(self) -> tuple[int, int]:
        return self.step, PHASE_ORDER.index(self.phase) if self.phase in PHASE_ORDER else len(PHASE_ORDER)

    def describe(self) -> str:
        where = "setup" if self.step == SETUP_STEP else f"step {self.step}"
        return f"rank {self.rank} at {where} ({self.phase})"


def explain_hang(me: Progress, stalled_s: float, timeout_s: float, peers: list[Progress],
                 world_size: int) -> str:
    """The message a firing watchdog prints: this rank's position, every rank's, and which is behind.

    A peer is *not answering* when its heartbeat is older than `timeout_s` (its process died or is stuck
    holding the GIL) or it never published; otherwise the ranks at the earliest (step, phase) are *behind*. If
    every rank is at the same place, they all wait in one collective that never completes.
    """
    known = {p.rank: p for p in peers}
    silent = [r for r in range(world_size) if r not in known or known[r].heartbeat_age_s > timeout_s]
    live = [p for p in peers if p.rank not in silent]
    lines = [f"meshplan: hang detected: {me.describe()} made no progress for {stalled_s:.1f} s "
             f"(--timeout-s {timeout_s:g})."]
    lines += [f"  {p.describe()}" + (f", last heartbeat {p.heartbeat_age_s:.1f} s ago" if p.rank in silent else "")
              for p in sorted(peers, key=lambda p: p.rank)]
    if silent:
        lines.append(f"rank(s) {', '.join(map(str, silent))} stopped answering"
                     + (f" at step {known[silent[0]].step}" if silent[0] in known else " before publishing progress")
                     + ": the process died or is stuck without releasing the GIL.")
    elif live:
        earliest = min(p.position() for p in live)
        behind = [p for p in live if p.position() == earliest]
        if len(behind) < len(live):
            lines.append(f"rank(s) {', '.join(str(p.rank) for p in behind)} stopped answering at "
                         f"{behind[0].describe().split(' at ', 1)[1]}: hung or far slower there, while the others "
                         "wait for them in a collective.")
        else:
            lines.append(f"every rank waits at {live[0].describe().split(' at ', 1)[1]}: a collective that never "
                         "completes (mismatched collectives across ranks, or a rank stuck inside one).")
    lines.append("If steps legitimately take this long, raise --timeout-s.")
    return "\n".join(lines)


class Watchdog:
    """Watches this rank's training loop; see the module docstring. Use as a context manager around training
    (after init_process_group) and call `enter(step, phase)` at each phase."""

    def __init__(self, timeout_s: float, poll_s: float | None = None):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self.poll_s = poll_s if poll_s is not None else min(1.0, self.timeout_s / 5)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self._store = dist.distributed_c10d._get_default_store()  # the rendezvous TCPStore every rank reaches
        self._progress = Progress(self.rank, SETUP_STEP, "build")
        self._since = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="meshplan-watchdog", daemon=True)

    def enter(self, step: int, phase: str) -> None:
        """Called by the training loop (main thread): this rank now starts `phase` of `step`."""
        self._progress = Progress(self.rank, step, phase)
        self._since = time.monotonic()

    def __enter__(self) -> Watchdog:
        self._publish()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _publish(self) -> None:
        p = self._progress
        self._store.set(_KEY.format(rank=self.rank), json.dumps({"step": p.step, "phase": p.phase,
                                                                 "time": time.time()}))

    def _read_peers(self) -> list[Progress]:
        peers = []
        for rank in range(self.world_size):
            key = _KEY.format(rank=rank)
            if self._store.check([key]):
                data = json.loads(self._store.get(key))
                peers.append(Progress(rank, data["step"], data["phase"], max(0.0, time.time() - data["time"])))
        return peers

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._publish()
                progress, stalled_s = self._progress, time.monotonic() - self._since
                if stalled_s < self.timeout_s:
                    continue
                message = explain_hang(progress, stalled_s, self.timeout_s, self._read_peers(), self.world_size)
            except Exception as err:  # the store went away: torchrun is tearing the job down; nothing to report
                print(f"meshplan: rank {self.rank} watchdog stopped: {type(err).__name__}: {err}", file=sys.stderr,
                      flush=True)
                return
            print(message, file=sys.stderr, flush=True)
            os._exit(HANG_EXIT_STATUS)  # the main thread is blocked in a collective: only a hard exit ends it
