"""Test-only hooks: fault injection (kill a worker at a step) and the per-rank row log that proves exact resume."""

from __future__ import annotations

import json
import logging
import os
import posixpath
import signal
from pathlib import Path

from ops import io
from workflows.session import Session
from workflows.settings import RunSettings

log = logging.getLogger("workflows.train")


def maybe_inject_fault(run: RunSettings, session: Session, step: int, output_dir: str) -> None:
    """Chaos test (``run.fault_step``): SIGKILL rank 0's process once, to prove that resume works. Every rank calls
    this at every step; the "done" marker lies beside the stage's output folder (on its filesystem, so that every
    node of a restarted run sees it)."""
    if not run.fault_step or step != run.fault_step:
        return
    marker = io.join(posixpath.dirname(output_dir.rstrip("/")), f"fault-{run.name}-done")
    if io.exists(marker):
        return
    if session.is_ray:
        import ray.train

        # The kill should come after Ray Train's controller has registered the checkpoint reported before, so the
        # run resumes from the newest one. A worker's result queue holds one report, so every rank's second empty
        # report returns only once the controller has polled the first -- that is, after the poll that took the
        # checkpoint's report had finished. (All ranks report: a report is a barrier across them.)
        for _ in range(2):
            ray.train.report({})
    if session.rank != 0:
        return
    io.write_text(marker, str(os.getpid()))
    log.warning("fault injection: killing worker pid %d at step %d", os.getpid(), step)
    os.kill(os.getpid(), signal.SIGKILL)


class RowLog:
    """Per-rank JSON lines ``{"attempt", "step", "row_ids"}``: proves every row is used once across restarts."""

    def __init__(self, folder: str | None, rank: int):
        self.file = Path(folder) / f"rank-{rank}.jsonl" if folder else None
        if self.file:
            self.file.parent.mkdir(parents=True, exist_ok=True)
        self.pid = os.getpid()

    def write(self, step: int, row_ids) -> None:
        if self.file:
            with self.file.open("a") as f:
                f.write(json.dumps({"pid": self.pid, "step": step, "row_ids": [int(r) for r in row_ids]}) + "\n")
