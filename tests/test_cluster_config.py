"""cluster.yaml passes Ray's own launcher schema (offline); the KubeRay manifest has the fields KubeRay needs."""

from __future__ import annotations

import copy
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
