# Two set-up commands on a fresh machine: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is the CPU wheel lying on this machine's disk; elsewhere pip takes the CUDA build that fits.
TORCH ?= torch==2.13.0

.PHONY: venv test demo clean mlflow-ui gpu-check image

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]" "$(TORCH)"
	touch $@

test: venv
	$(PY) -m pytest -q --durations=20 -m "not cluster" tests
	$(PY) -m pytest -q -m cluster tests

demo: venv
	$(PY) -m workflows.pipeline --config workflows/configs/demo.yaml

clean:
	rm -rf $(VENV) build *.egg-info

# The MLflow tracking server and UI over the demo's store (sqlite backend, artifacts on disk).
mlflow-ui: venv
	$(VENV)/bin/mlflow server --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
		--default-artifact-root $(CURDIR)/mlartifacts --host 127.0.0.1 --port 5000

# On a machine with a CUDA GPU (no Ray, no .venv needed: torch + transformers >= 5.23 + sentence-transformers):
# kernel parity under bf16 autocast, the kernel chosen, one step of each trainer without host syncs, and the
# benchmarks beside transformers' NomicBert and sentence-transformers. Results in gpu-check/summary.md.
GPU_PYTHON ?= python3
GPU_PAIRS ?= ../shared/data/pairs/stackexchange_pairs.jsonl
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --out gpu-check --pairs $(GPU_PAIRS)

# The cluster image (Dockerfile): what cluster.yaml and deploy/kuberay.yaml run. Push it where your nodes can pull
# from: `make image IMAGE=<registry>/nomic-embed-ray:<tag>` and name the same image in both files.
IMAGE ?= ghcr.io/nomic-embed-ray/nomic-embed-ray:0.1.0-ray2.60.0-cu128
image:
	docker build -t $(IMAGE) .
	docker push $(IMAGE)
