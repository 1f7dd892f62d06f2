"""`ray job submit` against a real `ray start --head`: a stage runs as a job; status and logs are visible.

Runs in its own pytest process (marker ``cluster``, see the Makefile): `ray stop` ends every Ray process of the
user, so it must not share a session with the in-process Ray of the other tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def ray_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([str(BIN / "ray"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.fixture()
def ray_head():
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    started = ray_cli("start", "--head", "--num-cpus=2", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
                      f"--temp-dir={temp}", "--include-dashboard=true")  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        yield "http://127.0.0.1:8265"
    finally:
        ray_cli("stop", "--force")
        shutil.rmtree(temp, ignore_errors=True)


def test_a_stage_runs_as_a_ray_job(ray_head, tmp_path, shared_data):
    config = yaml.safe_load((ROOT / "workflows/configs/mlm_data.yaml").read_text())
    config["output"] = str(tmp_path / "mlm-data")
    config["row_length"] = 512
    config["sources"] = [{"name": "wikitext", "path": str(shared_data / "mlm_corpus/wikitext2_raw/wiki.test.raw"),
                          "format": "text", "doc_split": "line", "max_rows_per_file": 300}]  # fmt: skip
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    job_id = f"mlm-data-{int(time.time())}"
    submitted = ray_cli("job", "submit", "--address", ray_head, "--submission-id", job_id, "--working-dir", ".",
                        "--", "python", "-m", "ops.mlm_data", "--config", str(tmp_path / "job.yaml"))  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    status = ray_cli("job", "status", "--address", ray_head, job_id)
    assert "succeeded" in (status.stdout + status.stderr).lower()
    logs = ray_cli("job", "logs", "--address", ray_head, job_id)
    assert "rows" in logs.stdout
    assert (tmp_path / "mlm-data" / "manifest.json").is_file()
