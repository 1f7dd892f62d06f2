"""What a user takes to a real cluster, checked offline: `deploy/kuberay.yaml` against the KubeRay RayJob CRD's own
OpenAPI schema (strict, as `kubectl apply --validate=strict`: an unknown field fails), every pod with the project's
image, a memory-backed /dev/shm, the shared storage and its node selector; cluster.yaml without shell-expanded
variables; the Dockerfile naming only things that exist."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
# KubeRay v1.7.0 (commit 9c13e71), ray-operator/config/crd/bases/ray.io_rayjobs.yaml: the release current with Ray 2.60
CRD = ROOT / "deploy" / "crd" / "ray.io_rayjobs.yaml"


def strict(schema: dict) -> dict:
    """A CRD's structural schema as JSON Schema that rejects unknown fields (Kubernetes prunes them silently, or
    refuses them under strict field validation): objects with ``properties`` get ``additionalProperties: false``
    unless they preserve unknown fields; ``nullable`` admits null."""
    schema = copy.deepcopy(schema)

    def visit(node):
        if isinstance(node, list):
            for item in node:
                visit(item)
            return
        if not isinstance(node, dict):
            return
        if "properties" in node and "additionalProperties" not in node and \
                not node.get("x-kubernetes-preserve-unknown-fields"):  # fmt: skip
            node["additionalProperties"] = False
        if node.get("nullable") and isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
        for value in node.values():
            visit(value)

    visit(schema)
    return schema


@functools.cache
def load_crd() -> dict:
    return yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1.4 MB


def crd_validator(manifest: dict) -> jsonschema.Draft7Validator:
    crd = load_crd()
    group, version = manifest["apiVersion"].split("/")
    assert (group, manifest["kind"]) == (crd["spec"]["group"], crd["spec"]["names"]["kind"])
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    return jsonschema.Draft7Validator(strict(served["schema"]["openAPIV3Schema"]))


def load(path: str) -> dict:
    return yaml.safe_load((ROOT / path).read_text())


def pods(job: dict) -> list[dict]:
    cluster = job["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]


def test_kuberay_manifest_validates_against_the_rayjob_crd():
    job = load("deploy/kuberay.yaml")
    errors = sorted(crd_validator(job).iter_errors(job), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


@pytest.mark.parametrize(("where", "mistake"), [
    (("spec",), {"entryPoint": "python -m workflows.pipeline"}),  # misspelt field
    (("spec", "rayClusterSpec", "workerGroupSpecs", 1), {"replica": 1}),
    (("spec", "rayClusterSpec", "workerGroupSpecs", 1, "template", "spec", "containers", 0), {"imagePullPolicy": 3}),
    (("spec", "rayClusterSpec", "authOptions"), {"mode": "off"}),  # not in the enum
    (("spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "volumes", 0, "emptyDir"), {"medium": 64}),
])  # fmt: skip
def test_a_wrong_field_fails_the_crd_validation(where, mistake):
    job = load("deploy/kuberay.yaml")
    node = job
    for key in where:
        node = node[key]
    node.update(mistake)
    assert list(crd_validator(job).iter_errors(job)), f"{where} {mistake} passed the CRD schema"


def test_every_pod_runs_the_image_with_shm_shared_storage_and_a_node_selector():
    job = load("deploy/kuberay.yaml")
    image = image_name()
    storage = dict(item.split("=", 1) for item in job["spec"]["entrypoint"].split() if "=" in item)["storage"]
    for pod in pods(job):
        (container,) = pod["containers"]
        assert container["image"] == image
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"
        shared = [path for path, volume in mounts.items() if "persistentVolumeClaim" in volume]
        assert any(storage.startswith(path + "/") for path in shared), f"{storage} is not on a shared volume"
        assert pod["nodeSelector"]
    gpu = [p for p in pods(job) if "nvidia.com/gpu" in p["containers"][0]["resources"]["limits"]]
    assert gpu and all(p["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8" for p in gpu)
    assert all("nvidia.com/gpu.product" in p["nodeSelector"] for p in gpu)


def test_mlflow_reaches_the_job_through_its_runtime_env():
    job = load("deploy/kuberay.yaml")
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http://")
    entry = job["spec"]["entrypoint"].split()
    config = entry[entry.index("--config") + 1]
    assert (ROOT / config).is_file()


def image_name() -> str:
    return load("cluster.yaml")["docker"]["image"]


def test_cluster_yaml_has_no_shell_expanded_variables_and_installs_nothing():
    text = (ROOT / "cluster.yaml").read_text()
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", code))
    assert used <= {"RAY_HEAD_IP"}, f"variables the launcher does not set: {used - {'RAY_HEAD_IP'}}"
    raw = load("cluster.yaml")
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands", "initialization_commands"):
        assert not raw.get(key), f"{key}: nodes must install nothing at start (the image has it all)"
    assert "pip install" not in code
    assert "MLFLOW_TRACKING_URI" not in code  # it reaches jobs through their runtime env
    assert any(option.startswith("--shm-size=") for option in raw["docker"]["run_options"])
    assert load("deploy/kuberay.yaml")["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"][
        "containers"][0]["image"] == raw["docker"]["image"]  # fmt: skip


def dockerfile() -> tuple[str, dict[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    args = dict(re.findall(r"^ARG (\w+)=(\S*)", text, re.MULTILINE))
    return text, args


def test_the_dockerfile_builds_on_the_pinned_ray_gpu_image():
    text, args = dockerfile()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ray_pin = next(d for d in project["dependencies"] if d.startswith("ray[")).split("==")[1]
    python = "py" + project["requires-python"].removeprefix(">=").replace(".", "")
    assert args["RAY_IMAGE"] == f"rayproject/ray:{ray_pin}-{python}-cu128"
    assert re.search(r"^FROM \$\{RAY_IMAGE\}$", text, re.MULTILINE)
    assert f"ray.__version__ == '{ray_pin}'" in text
    assert image_name().endswith(f"ray{ray_pin}-cu128") and image_name().split(":")[1].startswith(project["version"])
    # the torch index, the flash-attn wheel and the image agree on CUDA 12 / torch major.minor / CPython 3.11
    torch_minor = ".".join(args["TORCH_VERSION"].split(".")[:2])
    assert args["TORCH_INDEX"].endswith("/cu128")
    wheel = args["FLASH_ATTN_WHEEL"].replace("${FLASH_ATTN_VERSION}", args["FLASH_ATTN_VERSION"])
    assert wheel.endswith(f"+cu12torch{torch_minor}cxx11abiTRUE-{python.replace('py', 'cp')}-"
                          f"{python.replace('py', 'cp')}-linux_x86_64.whl")  # fmt: skip
    assert f"/v{args['FLASH_ATTN_VERSION']}/flash_attn-{args['FLASH_ATTN_VERSION']}+" in wheel


def test_the_dockerfile_names_only_what_exists_and_never_builds_flash_attn():
    text, _ = dockerfile()
    for source, _target in re.findall(r"^COPY (?:--\S+ )*(\S+) (\S+)$", text, re.MULTILINE):
        assert (ROOT / source).exists(), f"COPY {source}: not in the project"
    packages = {p for p in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
                ["find"]["include"]}  # fmt: skip
    copied = {s for s, _ in re.findall(r"^COPY (?:--\S+ )*(\S+) (\S+)$", text, re.MULTILINE)}
    assert {p.rstrip("*") for p in packages} <= copied
    installs = re.findall(r"pip install ([^&;\n]*)", text)
    assert installs and not any(re.search(r"flash.?attn(?![^\s]*\.whl)|\[gpu\]", line) for line in installs
                                if "FLASH_ATTN_WHEEL" not in line), installs  # fmt: skip
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored



def test_the_cluster_pipeline_configs_wire_and_validate(tmp_path):
    """Every stage config of the cluster pipelines, wired under a storage root, passes its own schema."""
    from ops.config import load_config
    from workflows.pipeline import STAGES, PipelineConfig, stage_config

    for name in ("pipeline_8gpu.yaml", "pipeline_multinode.yaml"):
        config = load_config(PipelineConfig, ROOT / "workflows" / "configs" / name, ["storage=s3://bucket/root"])
        done = {"mlm_data": {"output": "s3://bucket/root/mlm_data"}, "pair_data": {"output": "s3://bucket/root/p"},
                "mine_negatives": {"output": "s3://bucket/root/m"}, **{s: {"model": f"s3://bucket/root/{s}/model", "lineage": {}}
                for s in ("mlm", "contrastive", "finetune", "matryoshka")}}  # fmt: skip
        for stage in (s for s in STAGES if s.name in config.stages):
            cfg = stage_config(stage, config.stages[stage.name], config.storage, done)
            assert "../" not in yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(cfg), default=str)))
        assert cfg.encode.num_gpus == 1 and cfg.mteb == ["MTEB(eng, v1)"] and cfg.glue.data_dir is None
