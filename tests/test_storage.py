"""One storage root for the whole pipeline, on an S3-protocol server (moto's standalone server, reached through
pyarrow's S3 client with the endpoint in AWS_ENDPOINT_URL, as a user's MinIO or S3 would be) and on a local folder:
the corpus and the evaluation set are read from the store by URI, every stage's output, the Ray Train checkpoints,
the manifests and the pipeline state land under the root, and a pipeline stopped by a failing stage resumes from
there: the finished stages are skipped, the next one reads their outputs from the store.

On S3 the pipeline runs as a user runs it, `python -m workflows.pipeline` in its own process with its own local Ray
(the S3 settings reach Ray's workers through that process's environment); on a local folder it runs in the test's
Ray session. The Ray Train kill-and-resume itself is tested in test_train_distributed.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on the loopback address, a fresh bucket, and the client environment that points at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip
    fs = pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], scheme="http", region="us-east-1",
                           access_key="test", secret_key="test", allow_bucket_creation=True)  # fmt: skip
    bucket = f"nomic-{uuid.uuid4().hex[:8]}"
    fs.create_dir(bucket)
    yield fs, bucket, env
    server.stop()


def pipeline_yaml(folder: Path, storage: str, corpus: str, sts: str) -> Path:
    """mlm_data from the corpus URI -> mlm (tiny model, one real Ray Train worker) -> evaluate that model on the
    STS URI."""
    config = {
        "name": "storage-test", "storage": storage, "experiment": "storage-test",
        "ray": {"address": "local", "num_cpus": 2, "object_store_mb": 256},
        "stages": {
            "mlm_data": {"config": str(ROOT / "workflows/configs/mlm_data.yaml"), "overrides": [
                f"sources=[{{name: wikitext, path: '{corpus}', format: text, doc_split: line, max_rows_per_file: 200}}]",
                "row_length=128", "docs_per_pack=100", "num_cpus=0.5"]},
            "mlm": {"config": str(ROOT / "workflows/configs/mlm.yaml"), "overrides": [
                "global_batch=4", "micro_batch=4", "max_steps=4", "run.checkpoint_every=2", "run.log_every=1",
                "run.cpus_per_worker=0.5",
                "model_overrides={hidden_size: 32, num_attention_heads: 2, intermediate_size: 64, num_hidden_layers: 1}"]},
            "evaluate": {"config": str(ROOT / "workflows/configs/evaluate.yaml"), "overrides": [
                f"models={{mlm: '{storage}/mlm/model'}}", "baselines={}", "beir=[]", f"sts=[stsb={sts}]", "dims=[]",
                "limit=20", "glue.tasks=[]", "max_length=64"]},
        },
    }  # fmt: skip
    file = folder / "pipeline.yaml"
    file.write_text(yaml.safe_dump(config))
    return file


def run_pipeline(config: Path, cwd: Path, env: dict[str, str], returncode: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "workflows.pipeline", "--config", str(config)], cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert done.returncode == returncode, done.stdout[-4000:] + done.stderr[-6000:]
    return done


def listing(fs: pafs.FileSystem, root: str) -> set[str]:
    return {info.path.removeprefix(root + "/") for info in fs.get_file_info(pafs.FileSelector(root, recursive=True))
            if info.type == pafs.FileType.File}  # fmt: skip


def check_outputs(fs: pafs.FileSystem, root: str) -> None:
    files = listing(fs, root)
    assert {"pipeline_state.json", "summary.json", "mlm_data/manifest.json", "mlm/model/model.safetensors",
            "mlm/model/config.json", "evaluate/results.json", "evaluate/evaluation_table.md"} <= files, sorted(files)
    assert any(f.startswith("mlm_data/part-") for f in files)
    checkpoints = {f.split("/")[2] for f in files if f.startswith("ray_results/mlm-") and "/checkpoint-" in f}
    assert checkpoints, f"no Ray Train checkpoint under {root}/ray_results"
    with fs.open_input_stream(f"{root}/pipeline_state.json") as stream:
        state = json.loads(stream.read())
    assert {name: stage["status"] for name, stage in state["stages"].items()} == dict.fromkeys(
        ("mlm_data", "mlm", "evaluate"), "finished")  # fmt: skip
    assert state["stages"]["mlm"]["result"]["steps"] == 4
    with fs.open_input_stream(f"{root}/evaluate/results.json") as stream:
        scores = json.loads(stream.read())
    assert -1 <= scores["mlm"]["sts/stsb/spearman"] <= 1


def test_the_pipeline_on_an_s3_storage_root_resumes_from_there(s3, tmp_path, shared_data):
    fs, bucket, env = s3
    corpus, sts = f"s3://{bucket}/data/wiki.test.raw", f"s3://{bucket}/eval/stsb-test.tsv"

    def upload(local: Path, uri: str) -> None:
        pafs.copy_files(str(local), uri.removeprefix("s3://"), source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)  # fmt: skip

    upload(shared_data / "mlm_corpus/wikitext2_raw/wiki.test.raw", corpus)
    storage = f"s3://{bucket}/runs/demo"
    config = pipeline_yaml(tmp_path, storage, corpus, sts)
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "NOMIC_EMBED_CACHE": str(tmp_path / "cache")}  # fmt: skip
    # the evaluation set is not in the store yet: the evaluate stage fails, the two stages before it are kept
    first = run_pipeline(config, tmp_path, env, returncode=1)
    assert "stage 'evaluate' failed" in first.stderr and "stsb-test.tsv" in first.stderr
    upload(shared_data / "stsb/test.tsv", sts)
    again = run_pipeline(config, tmp_path, env)  # resumes from the state under the root
    console = again.stderr  # the stage lines are log lines; stdout holds the result table
    assert "mlm_data: finished earlier" in console and "mlm: finished earlier" in console, console[-4000:]
    assert "evaluate: started" in console and "mlm: started" not in console, console[-4000:]
    check_outputs(fs, f"{bucket}/runs/demo")
    local = {p.name for p in tmp_path.iterdir()}  # no output went to the working directory
    assert not local & {"mlm_data", "mlm", "evaluate", "ray_results", "outputs", "s3:", "pipeline_state.json"}, local


def test_the_same_pipeline_on_a_local_folder(tmp_path, shared_data, ray_session, mlflow_uri):
    from ops.config import load_config
    from workflows.pipeline import PipelineConfig
    from workflows.pipeline import run as run_in_process

    storage = tmp_path / "root"
    config = pipeline_yaml(tmp_path, str(storage), str(shared_data / "mlm_corpus/wikitext2_raw/wiki.test.raw"),
                           str(shared_data / "stsb/test.tsv"))  # fmt: skip
    run_in_process(load_config(PipelineConfig, config))
    check_outputs(pafs.LocalFileSystem(), str(storage))
