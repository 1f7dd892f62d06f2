"""The pipeline as a user runs it: a console of stage and progress lines within a budget, stages under one MLflow
parent run with lineage tags, restart skips, config changes re-run what depends on them, a failing stage prints
its error in full and keeps earlier outputs; the real MLflow server and its UI in a headless browser show the runs."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import yaml

from mlflow_server import free_port, mlflow_server
from mlflow_ui import browser, browser_missing, page_text

from evaluation.report import ui_path
from ops import console
from ops.config import load_config
from workflows.pipeline import PipelineConfig, StageFailed
from workflows.pipeline import main as pipeline_main
from workflows.pipeline import run as run_pipeline

ROOT = Path(__file__).resolve().parent.parent
MLM_STEPS = 4
QUIETED_FOR_TESTS = ("RAY_DATA_DISABLE_PROGRESS_BARS", "RAY_DATA_LOG_LEVEL", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")


def pipeline_raw(tmp_path: Path, shared: Path, evaluate_overrides: list[str]) -> dict:
    """The demo's first stages, smaller: mlm_data on a slice of the real corpus, a few MLM steps, and an evaluation of
    the MiniLM baseline on a slice of STS-B plus GLUE MRPC on a slice, fine-tuning the MLM checkpoint."""
    evaluate = tmp_path / "evaluate.yaml"
    evaluate.write_text(yaml.safe_dump({
        "baselines": {"minilm": "minilm"}, "sts": [f"stsb={shared}/stsb/test.tsv"], "limit": 20,
        "experiment": "platform-test",
        "glue": {"tasks": ["mrpc"], "data_dir": str(shared / "glue"), "max_length": 64, "epochs": 1,
                 "batch_sizes": [16], "learning_rates": [1e-4], "seeds": [0], "max_train_examples": 32,
                 "max_eval_examples": 32}}))  # fmt: skip
    return {
        "name": "platform-test",
        "storage": str(tmp_path / "out"),
        "experiment": "platform-test",
        "ray": {"num_cpus": 2, "object_store_mb": 512},
        "stages": {
            "mlm_data": {"config": str(ROOT / "workflows/configs/mlm_data.yaml"),
                         "overrides": [f"sources.0.path={shared}/mlm_corpus/wikipedia_en_sample.txt",
                                       "sources.0.max_rows_per_file=300", "sources.1.path=" + str(
                                           shared / "mlm_corpus/gutenberg/austen-emma.txt"),
                                       f"sources.2.path={shared}/mlm_corpus/wikitext2_raw/wiki.test.raw",
                                       "sources.2.max_rows_per_file=100", "row_length=512"]},
            "mlm": {"config": str(ROOT / "workflows/configs/mlm.yaml"),
                    "overrides": ["global_batch=2", "micro_batch=1", f"max_steps={MLM_STEPS}", "run.log_every=2",
                                  "run.checkpoint_every=4"]},
            "evaluate": {"config": str(evaluate), "overrides": evaluate_overrides},
        },
    }  # fmt: skip


def pipeline_config(tmp_path: Path, shared: Path, evaluate_overrides: list[str]) -> PipelineConfig:
    return load_config(PipelineConfig, raw=pipeline_raw(tmp_path, shared, evaluate_overrides))


def runs_by_name(experiment: str) -> dict[str, list]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id])
    named: dict[str, list] = {}
    for item in runs:
        named.setdefault(item.info.run_name, []).append(item)
    return named


@dataclass
class Finished:
    tmp: Path
    config: PipelineConfig
    done: dict
    console: str  # what the user saw on the terminal (stderr: stage, progress and warning lines)
    stdout: str  # the evaluation table and where to look


@pytest.fixture(scope="module")
def finished_pipeline(tmp_path_factory, shared_data, ray_session):
    """The pipeline as `make demo` runs it: its own process, its own local Ray, the console captured."""
    tmp = tmp_path_factory.mktemp("pipeline")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    config_file = tmp / "pipeline.yaml"
    config_file.write_text(yaml.safe_dump(pipeline_raw(tmp, shared_data, [])))
    env = {k: v for k, v in os.environ.items() if k not in QUIETED_FOR_TESTS}  # the console a user gets
    ran = subprocess.run([sys.executable, "-m", "workflows.pipeline", "--config", str(config_file)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    config = pipeline_config(tmp, shared_data, [])
    done = json.loads((tmp / "out" / "summary.json").read_text())
    yield Finished(tmp, config, done, ran.stderr, ran.stdout)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


WORKER = re.compile(r"\(.*?pid=(\d+)\)")  # the prefix Ray puts on a worker's lines
CRASH = re.compile(r"SIGABRT|SIGSEGV|Fatal Python error")
STAGE_LINE = re.compile(r"\[pipeline\] (\w+): (started|finished|failed)")
# what the console of a stage may hold besides its start and finish lines: progress lines (one per `log_every`
# steps for a trainer, at most one per 30 s otherwise) and a few warnings
EXTRA_LINES = {"mlm_data": 4, "mlm": MLM_STEPS // 2 + 4, "evaluate": 2 + 4}
NOISE = ("Failed to query Ray Train Controller", "PlacementGroupCleaner", "execution finished in", "Data sink",
         "Requesting resources", "worker group", "Moving model to device", "Checkpoint successfully created",
         "Reporting training result", "optimizer:", "Loading weights", "Progress bars disabled", "exclude_resources")


def test_console_stays_within_a_line_budget_per_stage(finished_pipeline):
    """Each stage: its start and finish lines, progress lines and at most a few others; Ray's and the libraries'
    routine lines in the log files, where the console says they are."""
    lines = finished_pipeline.console.splitlines()
    # a Ray worker that crashes (Ray retries its task) dumps its stack: shown, as every error, but not routine output
    crashed = {m[1] for line in lines if (m := WORKER.search(line)) and CRASH.search(line)}
    lines = [line for line in lines if not ((m := WORKER.search(line)) and m[1] in crashed)]
    marks = [(i, *m.groups()) for i, line in enumerate(lines) if (m := STAGE_LINE.search(line))]
    assert [(stage, what) for _, stage, what in marks] == [
        ("mlm_data", "started"), ("mlm_data", "finished"), ("mlm", "started"), ("mlm", "finished"),
        ("evaluate", "started"), ("evaluate", "finished")]  # fmt: skip
    starts = {stage: i for i, stage, what in marks if what == "started"}
    bounds = sorted(starts.values()) + [len(lines)]
    for stage, start in starts.items():
        # a stage's lines run to the next stage's start: a worker's last lines may arrive after the finish line
        own = lines[start + 1 : bounds[bounds.index(start) + 1]]
        assert len(own) - 1 <= EXTRA_LINES[stage], f"{stage}: {len(own)} lines\n" + "\n".join(own)
    progress = [line for line in lines if "[mlm] step " in line]
    assert len(progress) == MLM_STEPS // 2 and "eta" in progress[0], lines
    assert any("[evaluate] 2/2 models" in line for line in lines), lines
    assert len(lines) <= 30, "\n".join(lines)
    for noise in NOISE:
        assert not any(noise in line for line in lines), noise
    log_file = Path(re.search(r"full log: (\S+)", finished_pipeline.console)[1])
    ray_logs = Path(re.search(r"Ray's own logs: (\S+)", finished_pipeline.console)[1])
    assert log_file.parent == finished_pipeline.tmp / "out" / "logs"
    kept = log_file.read_text()
    assert "[pipeline] mlm: finished" in kept and "Started a local Ray instance" in kept
    assert any(ray_logs.glob("ray-data/ray-data*.log")) and any(ray_logs.glob("train/ray-train-*.log"))
    assert "eval minilm" not in finished_pipeline.stdout and "sts/avg_spearman" in finished_pipeline.stdout


def test_stages_run_under_one_parent_run(finished_pipeline):
    done = finished_pipeline.done
    assert set(done) == {"mlm_data", "mlm", "evaluate"}
    assert done["mlm_data"]["rows_out"] > 0 and Path(done["mlm_data"]["output"], "manifest.json").is_file()
    runs = runs_by_name("platform-test")
    parent = runs["platform-test"][0]
    for stage in ("mlm_data", "mlm", "evaluate"):
        (child,) = runs[stage]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
    (minilm,) = runs["eval minilm"]
    (glue,) = runs["eval glue (mlm)"]
    evaluate = runs["evaluate"][0].info.run_id
    assert minilm.data.tags["mlflow.parentRunId"] == glue.data.tags["mlflow.parentRunId"] == evaluate
    assert 0.5 < minilm.data.metrics["sts/stsb/spearman"] == minilm.data.metrics["sts/avg_spearman"] <= 1.0
    assert "glue/avg_main_metric" in glue.data.metrics
    table = (finished_pipeline.tmp / "out" / "evaluate" / "evaluation_table.md").read_text()
    assert "sts/stsb/spearman" in table and "minilm" in table
    every = [run for items in runs.values() for run in items]
    assert all(run.info.experiment_id == parent.info.experiment_id for run in every)
    kinds = {run.info.run_name: run.data.tags["run_kind"] for run in every}
    assert kinds == {"platform-test": "pipeline", "mlm_data": "stage", "mlm": "stage", "evaluate": "stage",
                     "eval minilm": "evaluation", "eval glue (mlm)": "evaluation"}  # fmt: skip
    client = mlflow.MlflowClient()
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"loss_curves.png", "evaluation_table.json", "evaluation_table.md", "summary.json"} <= artifacts
    assert "loss_curve.png" in {a.path for a in client.list_artifacts(runs["mlm"][0].info.run_id)}
    assert "evaluation_table.json" in json.loads(runs["evaluate"][0].data.tags["mlflow.loggedArtifacts"])[0]["path"]
    # the pipeline left mlflow's process-wide tracking URI and experiment alone
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
        assert mlflow.get_tracking_uri() == "sqlite:///elsewhere.db"


def test_every_run_says_where_it_came_from(finished_pipeline):
    """Lineage tags, read back through the tracking client: code, config, data manifests, checkpoint and its run."""
    from workflows.lineage import manifest_hash

    state = json.loads((finished_pipeline.tmp / "out" / "pipeline_state.json").read_text())
    runs = {name: items[0] for name, items in runs_by_name("platform-test").items()}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    data = manifest_hash(finished_pipeline.done["mlm_data"]["output"])
    for name, run in runs.items():
        tags = run.data.tags
        assert tags["lineage.git_commit"].removesuffix("+dirty") == commit, name
        assert len(tags["lineage.config_fingerprint"]) == 16, name
        if name not in ("mlm_data", "eval minilm"):  # what came after the data stage was built on its data
            assert tags["lineage.data.mlm_data"] == data, name
    assert runs["mlm_data"].data.tags["lineage.data.mlm_data"] == data  # the manifest the stage wrote
    for stage in ("mlm_data", "mlm", "evaluate"):
        assert runs[stage].data.tags["lineage.config_fingerprint"] == state["stages"][stage]["fingerprint"]
    assert runs["mlm"].data.tags["lineage.checkpoint"] == "tiny"  # a from-scratch run names the preset it starts from
    glue = runs["eval glue (mlm)"].data.tags
    assert glue["lineage.checkpoint"] == finished_pipeline.done["mlm"]["model"]
    assert glue["lineage.checkpoint_run"] == runs["mlm"].info.run_id == state["stages"]["mlm"]["run_id"]
    minilm = runs["eval minilm"].data.tags
    assert minilm["lineage.checkpoint"].endswith("model")  # the baseline: the package's folder, no run, no data
    assert not {"lineage.checkpoint_run", "lineage.data.mlm_data"} & set(minilm)
    built_on_mlm = f"tags.`lineage.checkpoint_run` = '{runs['mlm'].info.run_id}'"
    found = mlflow.search_runs(experiment_names=["platform-test"], filter_string=built_on_mlm)
    assert list(found["tags.mlflow.runName"]) == ["eval glue (mlm)"]


def test_restart_skips_finished_stages_and_reruns_changed_ones(finished_pipeline, shared_data, caplog):
    tmp, config, done = finished_pipeline.tmp, finished_pipeline.config, finished_pipeline.done
    caplog.set_level(logging.INFO, logger="workflows.pipeline")
    before = {name: len(items) for name, items in runs_by_name("platform-test").items()}
    again = run_pipeline(config)
    assert "mlm_data: finished earlier" in caplog.text and "evaluate: finished earlier" in caplog.text
    assert again["mlm_data"]["rows_out"] == done["mlm_data"]["rows_out"]
    assert again["evaluate"]["lineage"] == done["evaluate"]["lineage"]
    assert {name: len(items) for name, items in runs_by_name("platform-test").items()} == before
    caplog.clear()
    changed = pipeline_config(tmp, shared_data, ["limit=25"])
    run_pipeline(changed)
    assert "mlm: finished earlier" in caplog.text and "evaluate: started" in caplog.text
    runs = runs_by_name("platform-test")
    assert len(runs["evaluate"]) == 2 and len(runs["mlm_data"]) == 1 and len(runs["eval glue (mlm)"]) == 2


def test_a_failing_stage_prints_its_error_in_full_and_keeps_earlier_outputs(finished_pipeline, shared_data,
                                                                             capfd, monkeypatch):  # fmt: skip
    tmp = finished_pipeline.tmp
    for key in console.process_env(False):
        monkeypatch.setenv(key, "")  # main sets them for its process; put them back afterwards
    broken = tmp / "broken.yaml"
    broken.write_text(yaml.safe_dump(pipeline_raw(tmp, shared_data, [f"sts=[stsb={tmp}/missing.tsv]"])))
    with pytest.raises(SystemExit) as stopped:
        pipeline_main(["--config", str(broken)])
    assert stopped.value.code == 1
    shown = capfd.readouterr().err
    # the whole traceback down to the frame that raised, and the reason with the file it names, then the way out
    assert "[pipeline] evaluate: failed after" in shown and "Traceback (most recent call last):" in shown
    assert 'evaluation/data.py", line' in shown and "in load_pairs" in shown
    assert f"DataError: {tmp}/missing.tsv: no such STS file (expected .tsv or .jsonl with sentence1, sentence2, " \
           "score)" in shown  # fmt: skip
    assert "stopped: stage 'evaluate' failed" in shown and "run the same command again to resume" in shown
    log_file = Path(re.search(r"Full log: (\S+)", shown)[1])
    assert "in load_pairs" in log_file.read_text()
    state = json.loads((tmp / "out" / "pipeline_state.json").read_text())
    assert state["stages"]["mlm_data"]["status"] == state["stages"]["mlm"]["status"] == "finished"
    assert state["stages"]["evaluate"]["status"] == "failed"
    assert any((tmp / "out" / "mlm_data").glob("part-*.parquet"))
    failed = [r for r in runs_by_name("platform-test")["evaluate"] if r.info.status == "FAILED"]
    assert failed and "missing.tsv" in failed[0].data.tags["error"]
    with pytest.raises(StageFailed, match="stage 'evaluate' failed: .*missing.tsv"):
        run_pipeline(load_config(PipelineConfig, broken))


def test_mlflow_ui_opens_the_experiment_on_its_runs_with_the_stages_listed(finished_pipeline):
    """The real tracking server on the pipeline's store, read over HTTP, then its UI in a headless Chromium: the URL
    the pipeline prints lands on the model-training runs view, with the parent, the stages and the evaluation runs
    listed (the pipeline's parent and the evaluate stage open by themselves)."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
               f"sqlite:///{finished_pipeline.tmp / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]  # fmt: skip
    with mlflow_server(command, port) as url:
        client = mlflow.MlflowClient(tracking_uri=url)
        experiment = client.get_experiment_by_name("platform-test")
        names = {r.info.run_name for r in client.search_runs([experiment.experiment_id])}
        assert {"platform-test", "mlm_data", "mlm", "evaluate", "eval minilm", "eval glue (mlm)"} <= names
        assert f"http://127.0.0.1:5000/{ui_path(experiment.experiment_id)}" in finished_pipeline.stdout
        missing = browser_missing()
        if missing:
            pytest.skip(f"headless-browser check: {missing}")
        listed = ["platform-test", "mlm_data", "mlm", "evaluate", "eval minilm", "eval glue (mlm)"]
        with browser() as driver:
            text = page_text(driver, f"{url}/{ui_path(experiment.experiment_id)}", until=listed)
            where = driver.current_url
            driver.save_screenshot(str(finished_pipeline.tmp / "runs.png"))
        assert f"/experiments/{experiment.experiment_id}/runs" in where and "workflowType=machine_learning" in where
        for name in listed:
            assert name in text.split("\n"), f"{name} not listed on the runs view:\n{text}"
        assert "Run Name" in text and "Model training" in text
