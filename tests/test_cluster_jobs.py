"""Jobs on a cluster as the docs run them: `ray job submit --working-dir .` against a private `ray start --head`
(token auth), with the MLflow tracking URI given only in the job's runtime env (`--runtime-env-json`) and a real
`mlflow server` (sqlite backend, artifacts under a storage root) started here.

- A fine-tuning stage's Ray Train worker sees that URI (checked in the worker), logs through the server, and the
  final model is registered: `mlflow.sentence_transformers.load_model("models:/nomic-embed-text/1")` and the
  pyfunc that `mlflow models serve` runs give the embeddings of `python -m nomicbert embed`; the registered
  artifacts hold the model, not the optimizer state.
- The evaluate stage, under the pipeline's parent run, scores a BEIR set given by an s3:// URI (moto's S3 server;
  its settings travel in the runtime env too) and an mteb task built from local data, encoding in Ray Data actors.

Marker ``cluster``: a separate pytest process (see the Makefile). One head and one server for the module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow_server import free_port, mlflow_server
from ray_head import ray_head as start_ray_head
from train_helpers import make_pairs, pair_rows, stage_config

from ops.config import to_dict

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["search_query: what is a rotary position embedding?", "A man is playing a guitar on stage.",
         "search_document: Matryoshka embeddings keep their quality when truncated."]  # fmt: skip


@pytest.fixture(scope="module")
def ray_head():
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the jobs get it from their runtime env only
    with start_ray_head(num_cpus=2) as head:
        yield head


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` as docs/platform.md starts it: a database backend and the artifacts under the storage root."""
    state = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
               f"sqlite:///{state / 'mlflow.db'}", "--artifacts-destination", str(state / "storage" / "mlflow"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    with mlflow_server(command, port, log=state / "server.log") as url:
        yield url


def submit(head, runtime_env: dict, *entrypoint: str) -> subprocess.CompletedProcess:
    job_id = f"job-{int(time.time() * 1000)}"
    done = head.cli("job", "submit", "--address", head.dashboard_url, "--submission-id", job_id, "--working-dir", ".",
                    "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint)  # fmt: skip
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def finetuned(ray_head, server, tmp_path_factory, shared_data):
    """A fine-tuning job (one real Ray Train worker) that registers its model as nomic-embed-text."""
    from nomicbert.checkpoint import save_pretrained
    from nomicbert.config import tiny
    from nomicbert.model import NomicBertModel
    from nomicbert.tokenizer import load_tokenizer
    from workflows import finetune

    tmp = tmp_path_factory.mktemp("finetune")
    init = save_pretrained(NomicBertModel(tiny()), tmp / "init", load_tokenizer())
    data = make_pairs(pair_rows(shared_data, wiki=0, snli=32), tmp / "triplets", negatives=True)
    cfg = stage_config(finetune.FinetuneConfig, "finetune", tmp, data=str(data), init_checkpoint=str(init),
                       output_dir=str(tmp / "model"), global_batch=16, num_negatives=1, max_steps=2,
                       **{"run.num_workers": 1, "run.cpus_per_worker": 0.5, "run.checkpoint_every": 2,
                          "optim.warmup_steps": 1, "optim.warmup_ratio": 0.0, "mlflow.experiment": "cluster-jobs",
                          "mlflow.registered_model": "nomic-embed-text"})  # fmt: skip
    (tmp / "finetune.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(to_dict(cfg)))))
    done = submit(ray_head, {"env_vars": {"MLFLOW_TRACKING_URI": server}},
                  "python", "tests/stage_job_checking_mlflow_uri.py", server, str(tmp / "finetune.yaml"))
    return tmp, done.stdout + done.stderr


def test_the_runtime_env_uri_reaches_the_train_worker_and_the_model_is_registered(finetuned, server, monkeypatch):
    from mlflow import MlflowClient

    tmp, logs = finetuned
    assert f"MLFLOW_TRACKING_URI={server}" in logs  # printed by the check inside the Ray Train worker
    client = MlflowClient(server)
    (version,) = client.search_model_versions("name = 'nomic-embed-text'")
    assert version.version == "1"
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["registered_model"] == "models:/nomic-embed-text/1"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "finetune/loss")] == [1, 2]  # the worker's

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts("models:/nomic-embed-text/1", dst_path=str(tmp / "registered")))
    files = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]
    assert any(f.endswith(".safetensors") for f in files)
    assert not [f for f in files if "training_state" in f or "optimizer" in f], files

    expected = embed_cli(tmp / "model", tmp)
    encoder = mlflow.sentence_transformers.load_model("models:/nomic-embed-text/1")
    np.testing.assert_allclose(encoder.encode(TEXTS), expected, atol=1e-5)
    served = mlflow.pyfunc.load_model("models:/nomic-embed-text/1")  # what `mlflow models serve` answers with
    np.testing.assert_allclose(np.asarray(served.predict(TEXTS)), expected, atol=1e-5)


def embed_cli(model: Path, tmp: Path) -> np.ndarray:
    (tmp / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    done = subprocess.run([sys.executable, "-m", "nomicbert", "embed", "--model", str(model), "--input",
                           str(tmp / "texts.txt"), "--output", str(tmp / "emb.npy")],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return np.load(tmp / "emb.npy")


def test_the_evaluate_stage_scores_a_beir_uri_and_an_mteb_task_under_one_parent_run(ray_head, server, tmp_path,
                                                                                     shared_data):  # fmt: skip
    from mlflow import MlflowClient
    from moto.server import ThreadedMotoServer
    from pyarrow import fs as pafs

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    try:
        host, port = moto.get_host_and_port()
        aws = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
               "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
        s3 = pafs.S3FileSystem(endpoint_override=aws["AWS_ENDPOINT_URL"], scheme="http", region="us-east-1",
                               access_key="test", secret_key="test", allow_bucket_creation=True)  # fmt: skip
        s3.create_dir("eval-sets")
        pafs.copy_files(str(shared_data / "scifact"), "eval-sets/scifact", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=s3)  # fmt: skip
        evaluate = tmp_path / "evaluate.yaml"
        evaluate.write_text(yaml.safe_dump({
            "models": {}, "baselines": {"minilm": "minilm"}, "beir": ["scifact=s3://eval-sets/scifact"],
            "mteb": [f"scifact-mteb={shared_data / 'scifact'}"], "limit": 8, "max_length": 128,
            "experiment": "cluster-eval", "encode": {"workers": 1, "num_gpus": 0.0, "num_cpus": 1.0, "batch_size": 64},
        }))  # fmt: skip
        pipeline = tmp_path / "pipeline.yaml"
        pipeline.write_text(yaml.safe_dump({"name": "eval-on-cluster", "storage": str(tmp_path / "storage"),
                                            "experiment": "cluster-eval",
                                            "stages": {"evaluate": {"config": str(evaluate)}}}))  # fmt: skip
        submit(ray_head, {"env_vars": {"MLFLOW_TRACKING_URI": server, **aws}},
               "python", "-m", "workflows.pipeline", "--config", str(pipeline))
    finally:
        moto.stop()

    client = MlflowClient(server)
    experiment = client.get_experiment_by_name("cluster-eval")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    parent, stage, minilm = runs["eval-on-cluster"], runs["evaluate"], runs["eval minilm"]
    assert stage.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert minilm.data.tags["mlflow.parentRunId"] == stage.info.run_id
    metrics = minilm.data.metrics
    assert 0.3 < metrics["beir/scifact/ndcg_at_10"] <= 1.0
    assert 0.3 < metrics["mteb/scifact-mteb/ndcg_at_10"] <= 1.0
    assert "scifact" in minilm.data.params["data/beir/scifact"]
    assert (tmp_path / "storage" / "evaluate" / "results.json").is_file()
