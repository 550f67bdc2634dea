"""Device and precision for every trainer (offline, online, PPO roles) and the rollout engine.

One place decides which device a `device = "auto"` config runs on, whether bf16 autocast is on
for `precision = "auto"`, and which attention kernel `attention = "auto"` picks.

    python -c "from training.runtime import select_device, bf16_supported as b; \
print(b(select_device('auto')))"
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def select_device(choice: str) -> torch.device:
    """`cuda` when asked for, or for `auto` when a GPU is there; otherwise the CPU."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def bf16_supported(device: torch.device) -> bool:
    """bf16 autocast pays off where the hardware has bf16 matmuls (AVX512-BF16/AMX, Ampere+)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether a `precision = "bf16" | "fp32" | "auto"` setting runs under bf16 autocast."""
    return precision == "bf16" or (precision == "auto" and bf16_supported(device))


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on `device` when enabled, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# Longest sequence for which `attention = "auto"` picks eager attention on CPU. Measured with
# benchmarks/attention_cpu.py (forward + backward, bf16 autocast, 9 heads of 64, batch 4): eager
# is 4.2x faster than sdpa at 100 tokens and 1.7x at 256, and slower from about 512 (0.7x). Memory:
# eager keeps (B, heads, T, T) probabilities per layer for the backward. With 64-dim heads and an
# MLP about 3.5x the hidden size, that is heads * T / intermediate ~ T / 224 times what the MLP
# keeps per layer anyway, so at T <= 256 it at most about doubles the MLP's activations, for any
# model size (SmolLM2 DPO benchmark: peak 3472 MB against 3413 MB with sdpa).
EAGER_ATTENTION_MAX_LENGTH = 256


def attention_implementation(choice: str, device: torch.device, max_length: int) -> str:
    """The Hugging Face `attn_implementation` for an `attention` config setting."""
    if choice != "auto":
        return choice
    return "eager" if device.type == "cpu" and max_length <= EAGER_ATTENTION_MAX_LENGTH else "sdpa"


__all__ = ["EAGER_ATTENTION_MAX_LENGTH", "attention_implementation", "autocast",
           "bf16_supported", "select_device", "uses_bf16"]
