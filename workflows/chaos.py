"""Test-only hooks: fault injection (kill a worker at a step) and the per-rank row log that proves exact resume."""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import time
from pathlib import Path

from workflows.session import Session
from workflows.settings import RunSettings

log = logging.getLogger("workflows.train")


def maybe_inject_fault(run: RunSettings, session: Session, step: int, output_dir: str) -> None:
    """Chaos test (``run.fault_step``): SIGKILL rank 0's process once, to prove that resume works. The "done" marker
    lies beside the stage's output folder, or in the temp dir when that is remote."""
    if not run.fault_step or step != run.fault_step or session.rank != 0:
        return
    marker_dir = Path(tempfile.gettempdir()) if "://" in output_dir else Path(output_dir).parent
    marker = marker_dir / f"fault-{run.name}-done"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    if session.is_ray:
        # Ray Train's controller collects reports (and registers their checkpoints) by polling the workers every
        # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S; a kill before that poll resumes from the checkpoint before -- also
        # consistent, but the chaos test is meant to resume from the newest one
        time.sleep(3 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")))
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
