"""The pipeline as a user runs it: stages under one MLflow parent run, restart skips, config changes re-run what
depends on them, a failing stage names itself and keeps earlier outputs; the real MLflow server shows the runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow_server import free_port, mlflow_server

from ops.config import load_config
from workflows.pipeline import PipelineConfig, StageFailed
from workflows.pipeline import run as run_pipeline

ROOT = Path(__file__).resolve().parent.parent


def pipeline_config(tmp_path: Path, shared: Path, evaluate_overrides: list[str]) -> PipelineConfig:
    """mlm_data on a slice of the real corpus + evaluation of the MiniLM baseline on a slice of STS-B."""
    evaluate = tmp_path / "evaluate.yaml"
    evaluate.write_text(yaml.safe_dump({"baselines": {"minilm": "minilm"}, "sts": [f"stsb={shared}/stsb/test.tsv"],
                                        "limit": 20, "experiment": "platform-test"}))  # fmt: skip
    raw = {
        "name": "platform-test",
        "storage": str(tmp_path / "out"),
        "experiment": "platform-test",
        "stages": {
            "mlm_data": {"config": str(ROOT / "workflows/configs/mlm_data.yaml"),
                         "overrides": [f"sources.0.path={shared}/mlm_corpus/wikipedia_en_sample.txt",
                                       "sources.0.max_rows_per_file=300", "sources.1.path=" + str(
                                           shared / "mlm_corpus/gutenberg/austen-emma.txt"),
                                       f"sources.2.path={shared}/mlm_corpus/wikitext2_raw/wiki.test.raw",
                                       "sources.2.max_rows_per_file=100", "row_length=512"]},
            "evaluate": {"config": str(evaluate), "overrides": evaluate_overrides},
        },
    }  # fmt: skip
    return load_config(PipelineConfig, raw=raw)


def runs_by_name(experiment: str) -> dict[str, list]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id])
    named: dict[str, list] = {}
    for item in runs:
        named.setdefault(item.info.run_name, []).append(item)
    return named


@pytest.fixture(scope="module")
def finished_pipeline(tmp_path_factory, shared_data, ray_session):
    tmp = tmp_path_factory.mktemp("pipeline")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    config = pipeline_config(tmp, shared_data, [])
    done = run_pipeline(config)
    yield tmp, config, done
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def test_stages_run_under_one_parent_run(finished_pipeline):
    tmp, config, done = finished_pipeline
    assert set(done) == {"mlm_data", "evaluate"}
    assert done["mlm_data"]["rows_out"] > 0 and Path(done["mlm_data"]["output"], "manifest.json").is_file()
    runs = runs_by_name("platform-test")
    parent = runs["platform-test"][0]
    for stage in ("mlm_data", "evaluate"):
        (child,) = runs[stage]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
    (minilm,) = runs["minilm"]
    assert minilm.data.tags["mlflow.parentRunId"] == runs["evaluate"][0].info.run_id
    assert 0.5 < minilm.data.metrics["sts/stsb/spearman"] <= 1.0
    table = (tmp / "out" / "evaluate" / "evaluation_table.md").read_text()
    assert "sts/stsb/spearman" in table and "minilm" in table
    assert all(child.info.experiment_id == parent.info.experiment_id for child in runs["evaluate"] + runs["minilm"])
    # the pipeline left mlflow's process-wide tracking URI and experiment alone
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
        assert mlflow.get_tracking_uri() == "sqlite:///elsewhere.db"


def test_restart_skips_finished_stages_and_reruns_changed_ones(finished_pipeline, shared_data, capsys):
    tmp, config, done = finished_pipeline
    before = {name: len(items) for name, items in runs_by_name("platform-test").items()}
    again = run_pipeline(config)
    out = capsys.readouterr().out
    assert "mlm_data: finished earlier" in out and "evaluate: finished earlier" in out
    assert again["mlm_data"]["rows_out"] == done["mlm_data"]["rows_out"]
    assert {name: len(items) for name, items in runs_by_name("platform-test").items()} == before
    changed = pipeline_config(tmp, shared_data, ["limit=25"])
    run_pipeline(changed)
    out = capsys.readouterr().out
    assert "mlm_data: finished earlier" in out and "evaluate: running" in out
    runs = runs_by_name("platform-test")
    assert len(runs["evaluate"]) == 2 and len(runs["mlm_data"]) == 1


def test_failing_stage_names_itself_and_keeps_earlier_outputs(finished_pipeline, shared_data):
    tmp, config, _ = finished_pipeline
    broken = pipeline_config(tmp, shared_data, [f"sts=[stsb={tmp}/missing.tsv]"])
    with pytest.raises(StageFailed, match="stage 'evaluate' failed: .*missing.tsv"):
        run_pipeline(broken)
    state = json.loads((tmp / "out" / "pipeline_state.json").read_text())
    assert state["stages"]["mlm_data"]["status"] == "finished"
    assert state["stages"]["evaluate"]["status"] == "failed"
    assert any((tmp / "out" / "mlm_data").glob("part-*.parquet"))
    failed = [r for r in runs_by_name("platform-test")["evaluate"] if r.info.status == "FAILED"]
    assert failed and "missing.tsv" in failed[0].data.tags["error"]


def test_mlflow_server_shows_the_pipeline_runs(finished_pipeline):
    """Start the real tracking server on the pipeline's store; read the runs back over HTTP (and in a browser)."""
    tmp, _, _ = finished_pipeline
    port = free_port()
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
               f"sqlite:///{tmp / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    with mlflow_server(command, port) as url:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=url)
        experiment = client.get_experiment_by_name("platform-test")
        names = {r.info.run_name for r in client.search_runs([experiment.experiment_id])}
        assert {"platform-test", "mlm_data", "evaluate", "minilm"} <= names
        scored = [r for r in client.search_runs([experiment.experiment_id])
                  if r.info.run_name == "minilm" and "sts/stsb/spearman" in r.data.metrics]  # fmt: skip
        assert scored
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium:
            dom = subprocess.run(
                [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp / 'chromium'}", "--virtual-time-budget=20000", "--dump-dom",
                 f"{url}/#/experiments/{experiment.experiment_id}"],
                capture_output=True, text=True, timeout=120).stdout  # fmt: skip
            assert "platform-test" in dom, "the MLflow UI page did not render the pipeline's run"
