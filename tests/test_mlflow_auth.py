"""The cluster MLflow server, `deploy/mlflow-server.sh` (MLflow's basic-auth app on one private address), for real:
a training stage logs through it with credentials from the environment, its Ray Train worker included; without
credentials, or with a wrong password, the server refuses; the script refuses to listen on every interface.
One server for the module (it takes ~15 s to start on 2 cores)."""

from __future__ import annotations

import os
import secrets
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow_server import free_port, mlflow_server
from train_helpers import make_mlm_data, metric_history, stage_config

from workflows import mlm
from workflows.tracking import CLIENT_ENV

SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "mlflow-server.sh"
ADMIN_PASSWORD = secrets.token_urlsafe(16)
PIPELINE_PASSWORD = secrets.token_urlsafe(16)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    state = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_ENV}
    env["MLFLOW_AUTH_ADMIN_PASSWORD"] = ADMIN_PASSWORD
    command = [str(SCRIPT), "127.0.0.1", str(port), str(state), "--workers", "1"]
    with mlflow_server(command, port, env, log=state / "server.log") as url:
        yield url


@pytest.fixture()
def no_credentials(monkeypatch):
    for key in CLIENT_ENV:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def tiny_mlm(tmp_path: Path, shared_data: Path, **overrides):
    data = make_mlm_data(shared_data, tmp_path / "mlm-data", rows=16, row_length=64)
    return stage_config(mlm.MLMConfig, "mlm", tmp_path, data=str(data), output_dir=str(tmp_path / "model"),
                        model="tiny", model_overrides={}, global_batch=8, micro_batch=8, epochs=1, max_steps=0,
                        **{"mlflow.experiment": "auth-test", "run.checkpoint_every": 2, **overrides})  # fmt: skip


def test_the_script_refuses_to_listen_on_every_interface(tmp_path):
    for host in ("0.0.0.0", "::"):
        done = subprocess.run([str(SCRIPT), host, "5000", str(tmp_path / "state")], capture_output=True, text=True)
        assert done.returncode == 2 and "every interface" in done.stderr
    assert not (tmp_path / "state").exists()


def test_a_stage_logs_with_credentials_from_the_environment(server, tmp_path, ray_session, shared_data,
                                                             no_credentials):  # fmt: skip
    from mlflow.server import get_app_client

    no_credentials.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    no_credentials.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    get_app_client("basic-auth", tracking_uri=server).create_user("pipeline", PIPELINE_PASSWORD)
    no_credentials.setenv("MLFLOW_TRACKING_URI", server)
    no_credentials.setenv("MLFLOW_TRACKING_USERNAME", "pipeline")
    no_credentials.setenv("MLFLOW_TRACKING_PASSWORD", PIPELINE_PASSWORD)
    # one real Ray Train worker: its process logs the per-step metrics, with credentials it got from the driver
    result = mlm.run(tiny_mlm(tmp_path, shared_data, **{"run.num_workers": 1, "run.cpus_per_worker": 0.5}))

    client = MlflowClient(server)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["global_batch"] == "8"
    assert sorted(metric_history(result["mlflow_run_id"], "mlm/loss")) == [1, 2]
    assert "model" in {a.path for a in client.list_artifacts(run.info.run_id)}  # through the server's proxy


def test_without_credentials_the_server_refuses(server, tmp_path, ray_session, shared_data, no_credentials):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{server}/api/2.0/mlflow/experiments/search?max_results=1", timeout=60)
    assert refused.value.code == 401
    no_credentials.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    no_credentials.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    with pytest.raises(MlflowException, match="not authenticated"):
        MlflowClient(server).search_experiments()
    no_credentials.delenv("MLFLOW_TRACKING_USERNAME")
    no_credentials.delenv("MLFLOW_TRACKING_PASSWORD")
    no_credentials.setenv("MLFLOW_TRACKING_URI", server)
    with pytest.raises(MlflowException, match="not authenticated"):  # before any training step
        mlm.run(tiny_mlm(tmp_path, shared_data))
    assert not (tmp_path / "model").exists()
