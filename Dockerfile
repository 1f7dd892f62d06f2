# The image every node of cluster.yaml and deploy/kuberay.yaml runs: the official Ray GPU image of the pinned Ray
# (2.60.0, Python 3.11, CUDA 12.8), PyTorch for that CUDA, flash-attn from its prebuilt release wheel, and this
# project with its dependencies, so a node installs nothing when it starts.
#
#   make image                                   # docker build -t $(IMAGE) . && docker push $(IMAGE)
#   docker build --build-arg FLASH_ATTN_WHEEL= -t nomic-embed-ray:dev .      # without flash-attn
#
# flash-attn is never built from source here (its sdist compiles CUDA for tens of minutes and often fails): the
# wheel named by FLASH_ATTN_WHEEL is installed, or, when none fits this torch/CUDA/Python, the build says so and
# the model uses PyTorch's own varlen/SDPA kernels (attn_backend: auto picks what is installed).
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cu128
FROM ${RAY_IMAGE}

# PyTorch for the image's CUDA 12.8. flash-attn's release wheels are named
# flash_attn-<version>+cu<CUDA major>torch<major.minor>cxx11abi<TRUE|FALSE>-cp<python>-cp<python>-linux_x86_64.whl
# (PyTorch >= 2.7 wheels use the C++11 ABI); change the three together.
ARG TORCH_VERSION=2.10.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG FLASH_ATTN_VERSION=2.8.3.post2
ARG FLASH_ATTN_WHEEL=https://github.com/Dao-AILab/flash-attention/releases/download/v${FLASH_ATTN_VERSION}/flash_attn-${FLASH_ATTN_VERSION}+cu12torch2.10cxx11abiTRUE-cp311-cp311-linux_x86_64.whl

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    RAY_USAGE_STATS_ENABLED=0

RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN if [[ -z "${FLASH_ATTN_WHEEL}" ]]; then \
        echo "FLASH_ATTN_WHEEL is empty: no flash-attn, PyTorch's attention kernels will be used"; \
    elif pip install --no-deps "${FLASH_ATTN_WHEEL}"; then \
        python -c "import flash_attn; print('flash-attn', flash_attn.__version__)"; \
    else \
        echo "WARNING: no prebuilt flash-attn wheel at ${FLASH_ATTN_WHEEL} for torch ${TORCH_VERSION};" \
             "the model will use PyTorch's attention kernels (set FLASH_ATTN_WHEEL to a wheel that fits)"; \
    fi

# The project and its dependencies (not the [gpu] extra: that one would compile flash-attn from its sdist).
WORKDIR /home/ray/app
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users nomicbert nomicbert
COPY --chown=ray:users ops ops
COPY --chown=ray:users workflows workflows
COPY --chown=ray:users evaluation evaluation
COPY --chown=ray:users deploy/mlflow-server.sh deploy/mlflow-server.sh
RUN pip install . "torch==${TORCH_VERSION}" --extra-index-url "${TORCH_INDEX}" \
    && python -c "import ray, torch, mlflow, nomicbert, ops, workflows, evaluation; \
assert ray.__version__ == '2.60.0', ray.__version__; print('ray', ray.__version__, 'torch', torch.__version__)"
