"""`ray job submit` against a real `ray start --head` in token-auth mode: a stage runs as a job with the token;
status and logs are visible; a client without the token (or with a wrong one) is refused.

Marker ``cluster`` (a separate pytest process, see the Makefile): the head is a second Ray beside the in-process
session of the other tests. `tests/ray_head.py` gives it its own ports, temp dir and token and ends only it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from ray_head import ray_head as start_ray_head

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ray_head():
    with start_ray_head(num_cpus=2) as head:
        yield head


def test_a_stage_runs_as_a_ray_job(ray_head, tmp_path, shared_data):
    config = yaml.safe_load((ROOT / "workflows/configs/mlm_data.yaml").read_text())
    config["output"] = str(tmp_path / "mlm-data")
    config["row_length"] = 512
    config["sources"] = [{"name": "wikitext", "path": str(shared_data / "mlm_corpus/wikitext2_raw/wiki.test.raw"),
                          "format": "text", "doc_split": "line", "max_rows_per_file": 300}]  # fmt: skip
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    job_id = f"mlm-data-{int(time.time())}"
    submitted = ray_head.cli("job", "submit", "--address", ray_head.dashboard_url, "--submission-id", job_id,
                             "--working-dir", ".", "--",
                             "python", "-m", "ops.mlm_data", "--config", str(tmp_path / "job.yaml"))  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    status = ray_head.cli("job", "status", "--address", ray_head.dashboard_url, job_id)
    assert "succeeded" in (status.stdout + status.stderr).lower()
    logs = ray_head.cli("job", "logs", "--address", ray_head.dashboard_url, job_id)
    assert "rows" in logs.stdout
    assert (tmp_path / "mlm-data" / "manifest.json").is_file()


def test_a_submit_without_the_token_is_refused(ray_head, tmp_path):
    marker = tmp_path / "ran"
    command = ["job", "submit", "--address", ray_head.dashboard_url, "--", "python", "-c", f"open('{marker}', 'w')"]
    anonymous = ray_head.cli(*command, with_token=False, timeout=120)
    assert anonymous.returncode != 0
    assert "authentication" in (anonymous.stdout + anonymous.stderr).lower()
    wrong = ray_head.cli(*command, env={**ray_head.env(), "RAY_AUTH_TOKEN": "0" * 64}, timeout=120)
    assert wrong.returncode != 0
    assert "authentication" in (wrong.stdout + wrong.stderr).lower()
    assert not marker.exists()
