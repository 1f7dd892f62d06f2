"""MLflow for the training stages: the stage run, the dataset manifest, the tracking URI workers can reach."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from workflows.settings import MlflowSettings

log = logging.getLogger("workflows.train")
# What an MLflow client needs besides the URI: credentials (a basic-auth server) and TLS settings.
CLIENT_ENV = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
)


@contextlib.contextmanager
def mlflow_run(stage: str, config: Any, settings: MlflowSettings) -> Iterator[dict[str, str]]:
    """The active run (a pipeline's child run, which has the params and the lineage tags already), else a new run
    named after the stage with the whole config as params and its lineage (`workflows.lineage`: code, config, input
    data manifest, starting checkpoint), nested under ``parent_run_id`` / $MLFLOW_PARENT_RUN_ID if given."""
    import mlflow

    from ops.config import fingerprint, flatten
    from ops.io import exists, join
    from workflows import lineage

    uri = tracking_uri()
    active = mlflow.active_run()
    if active is not None:
        yield {"run_id": active.info.run_id, "tracking_uri": uri}
        return
    parent = settings.parent_run_id or os.environ.get("MLFLOW_PARENT_RUN_ID")
    inputs: dict[str, str] = {}
    if exists(join(config.data, "manifest.json")):  # keyed by the data folder's name (the pipeline: its stage's)
        inputs[lineage.DATA_PREFIX + Path(config.data).name] = lineage.manifest_hash(config.data)
    start = getattr(config, "init_checkpoint", None) or getattr(config, "model", None)
    if isinstance(start, str):
        inputs[lineage.CHECKPOINT] = start
    tags = {"stage": stage, **lineage.run_tags("stage", fingerprint(config), inputs),
            **({"mlflow.parentRunId": parent} if parent else {})}  # fmt: skip
    from evaluation.report import experiment_id

    experiment = experiment_id(settings.experiment, settings.artifact_location)
    with mlflow.start_run(experiment_id=experiment, run_name=stage, tags=tags) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(config).items()})
        yield {"run_id": run.info.run_id, "tracking_uri": uri}


def log_manifest(data_dir: str) -> None:
    """The dataset manifest of the stage's input folder as an MLflow artifact (and a few params)."""
    import mlflow

    from ops.io import exists, join, read_manifest

    if not exists(join(data_dir, "manifest.json")):
        log.warning("no manifest.json in %s; the run records no dataset manifest", data_dir)
        return
    manifest = read_manifest(data_dir)
    mlflow.log_dict(manifest, "dataset/manifest.json")
    mlflow.set_tag("dataset", data_dir)


def log_model(model_dir: Path, kind: str, registered_model: str | None) -> str | None:
    """The exported model as the run's artifact, without ``training_state/`` (optimizer, RNG): an encoder as an
    MLflow sentence-transformers model (its ``st/`` export, loadable with `mlflow.sentence_transformers.load_model`
    and servable with `mlflow models serve`), registered as a new version of ``registered_model`` if given; a
    masked-LM checkpoint as files. Returns the registered ``models:/<name>/<version>`` URI, or None."""
    import mlflow

    from workflows.checkpoints import STATE_DIR

    # ours: the sentence-transformers export in st/; an adapted transformers model: the folder itself is one
    st_folder = model_dir / "st" if (model_dir / "st").is_dir() else model_dir
    if kind != "encoder" or not (st_folder / "modules.json").is_file():
        for item in sorted(model_dir.iterdir()):
            if item.name == STATE_DIR:
                continue
            if item.is_dir():
                mlflow.log_artifacts(str(item), f"model/{item.name}")
            else:
                mlflow.log_artifact(str(item), "model")
        if registered_model:
            log.warning("registered_model %s: only encoders are registered (this is a %s checkpoint)", registered_model,
                        kind)  # fmt: skip
        return None
    from sentence_transformers import SentenceTransformer

    encoder = SentenceTransformer(str(st_folder), device="cpu")
    info = mlflow.sentence_transformers.log_model(
        encoder, name="model", registered_model_name=registered_model, task=None,
        input_example=["search_query: what is a rotary position embedding?"],
        pip_requirements=["sentence-transformers", "torch", "transformers"])  # fmt: skip
    if not registered_model:
        return None
    uri = f"models:/{registered_model}/{info.registered_model_version}"
    mlflow.set_tag("registered_model", uri)
    return uri


def tracking_uri() -> str:
    """MLflow's tracking URI with a relative sqlite path made absolute (workers run elsewhere)."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def check_reachable_from_workers(uri: str) -> None:
    """A sqlite (or file) store lives on the driver's node: on a cluster whose work runs on other nodes, the Ray
    Train workers that log could not open it. Fail before any work with what to do instead."""
    import ray

    if not uri.startswith(("sqlite:", "file:", "/")) or not ray.is_initialized():
        return
    nodes = [n for n in ray.nodes() if n["Alive"]]
    here = ray.get_runtime_context().get_node_id()
    local_cpus = next((n["Resources"].get("CPU", 0) for n in nodes if n["NodeID"] == here), 0)
    if len(nodes) > 1 or local_cpus == 0:
        raise RuntimeError(f"MLFLOW_TRACKING_URI is {uri}, a file on the driver's node, but this Ray cluster runs "
                           "work on other nodes, whose workers cannot open it. Start a tracking server "
                           "(docs/platform.md) and give its URL to the job: ray job submit --runtime-env-json "
                           "'{\"env_vars\": {\"MLFLOW_TRACKING_URI\": \"http://<server>:5000\"}}' ...")  # fmt: skip


def client_env() -> dict[str, str]:
    """The driver's MLflow client settings, for the Ray workers that log: a worker inherits the environment of the
    Ray node it runs on, not the driver's, unless the driver started that Ray itself."""
    return {key: os.environ[key] for key in CLIENT_ENV if os.environ.get(key)}
