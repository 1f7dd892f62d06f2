"""cluster.yaml passes Ray's own launcher schema (offline); the KubeRay manifest has the fields KubeRay needs."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def load(path: str) -> dict:
    return yaml.safe_load((PROJECT_ROOT / path).read_text())


def test_cluster_yaml_passes_ray_schema_validation():
    raw = load("cluster.yaml")
    validate_config(prepare_config(copy.deepcopy(raw)))
    node_types = raw["available_node_types"]
    assert node_types[raw["head_node_type"]]["resources"] == {"CPU": 0}
    assert any(t["resources"].get("GPU") == 8 for t in node_types.values())
    assert all(t.get("max_workers", 0) >= t.get("min_workers", 0) for t in node_types.values())


def test_validation_really_catches_mistakes():
    raw = load("cluster.yaml")
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_8xh100"]["resources"]["GPU"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))
    broken = copy.deepcopy(raw)
    broken["head_node_type"] = "missing"
    with pytest.raises(ValueError):
        validate_config(prepare_config(broken))


def test_kuberay_manifest_is_a_rayjob_with_autoscaling_gpu_workers():
    job = load("deploy/kuberay.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"].startswith("python -m workflows.pipeline --config workflows/configs/")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]  # fmt: skip
    assert gpu_groups and all(g["maxReplicas"] >= g["minReplicas"] for g in gpu_groups)


# Security defaults: what a user copies from this repository keeps Ray's token authentication on, listens on
# localhost where it can, and holds no credentials.
USER_FACING = ("README.md", "Makefile", "cluster.yaml", "deploy", "docs", "workflows", "ops", "evaluation",
               "nomicbert", "benchmarks")  # fmt: skip
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|SECRET_KEY|^RAY_AUTH_TOKEN|^MLFLOW_TRACKING_TOKEN)$")


def user_facing_files() -> list[Path]:
    files = []
    for entry in USER_FACING:
        path = PROJECT_ROOT / entry
        if path.is_dir():
            files += [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        else:
            files.append(path)
    return files


def test_nothing_a_user_copies_switches_ray_authentication_off():
    opt_out = "RAY_AUTH_MODE=" + "disabled"
    offenders = [str(p.relative_to(PROJECT_ROOT)) for p in user_facing_files()
                 if opt_out in p.read_text(errors="ignore")]  # fmt: skip
    assert not offenders, f"{opt_out} in {offenders}"


def test_cluster_yaml_dashboard_on_localhost_and_token_auth_on_every_node():
    raw = load("cluster.yaml")
    assert "--dashboard-host=127.0.0.1" in " ".join(raw["head_start_ray_commands"])
    assert "0.0.0.0" not in (PROJECT_ROOT / "cluster.yaml").read_text()
    options = raw["docker"]["run_options"]
    assert "-e RAY_AUTH_MODE=token" in options
    token_path = next(o.split("=", 1)[1] for o in options if o.startswith("-e RAY_AUTH_TOKEN_PATH="))
    assert raw["file_mounts"][token_path] == "~/.ray/auth_token"  # the token `ray get-auth-token --generate` made


def test_kuberay_cluster_has_token_auth_and_an_in_cluster_service_only():
    cluster = load("deploy/kuberay.yaml")["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"


def named_values(node) -> list[tuple[str, object]]:
    """(name, value) of every setting in a config tree: mapping items, Kubernetes env entries, `-e NAME=value`
    docker options and the env vars of an embedded runtime-env YAML."""
    found = []
    if isinstance(node, dict):
        if "name" in node and ("value" in node or "valueFrom" in node):
            found.append((node["name"], node.get("value")))
        for key, value in node.items():
            if isinstance(value, str) and key == "runtimeEnvYAML":
                found += named_values(yaml.safe_load(value))
            elif isinstance(value, (dict, list)):
                found += named_values(value)
            else:
                found.append((str(key), value))
    elif isinstance(node, list):
        for item in node:
            if isinstance(item, str) and item.startswith("-e ") and "=" in item:
                found.append(tuple(item[3:].split("=", 1)))
            else:
                found += named_values(item)
    return found


def test_no_credentials_in_yaml():
    files = [PROJECT_ROOT / "cluster.yaml", *(PROJECT_ROOT / "deploy").glob("*.yaml"),
             *(PROJECT_ROOT / "workflows" / "configs").glob("*.yaml")]  # fmt: skip
    literal = [(str(f.relative_to(PROJECT_ROOT)), name) for f in files for name, value in named_values(load(str(f)))
               if SECRET_NAME.search(name.upper()) and value not in (None, "") and "${" not in str(value)]  # fmt: skip
    assert not literal, f"credentials written into YAML: {literal}"
    planted = {"env": [{"name": "MLFLOW_TRACKING_PASSWORD", "value": "hunter2"}], "run_options": ["-e X_SECRET=1"]}
    assert {("MLFLOW_TRACKING_PASSWORD", "hunter2"), ("X_SECRET", "1")} <= set(named_values(planted))  # it can fail
