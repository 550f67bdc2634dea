"""The model and hardware fields that the train, online and PPO configs share.

Declared once and inherited, so `lora=auto`, `lora_r`, `device`, `precision` and `attention`
mean the same in `prefloop train sft|rm|dpo|kto`, `train grpo|rs|online-dpo` and `train ppo`;
the code that acts on them is written once too (training/policy.py, training/runtime.py). Each
config keeps its own range checks in `__post_init__`.

    python -c "from training.config import TrainConfig; print(TrainConfig().lora_r)"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ModelOptions:
    """LoRA and device: how the trained model(s) are wrapped and where they run."""

    lora: Literal["auto", "on", "off"] = "auto"
    """auto = LoRA on CPU (for every trained model: the policy, PPO's actor and critic), full
    fine-tuning on GPU."""
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass(frozen=True)
class KernelOptions:
    """Precision and attention kernel of the model being trained."""

    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 = bf16 autocast with fp32 master weights; auto = bf16 where the hardware supports it."""
    attention: Literal["auto", "sdpa", "eager"] = "auto"
    """Attention kernel. auto = eager (matmul + softmax) on CPU when the longest sequence (offline:
    max_length; online: the longest prompt plus max_new_tokens) is at most
    training.runtime.EAGER_ATTENTION_MAX_LENGTH (256) tokens, sdpa otherwise: on CPU, torch's
    flash-attention backward is several times slower than the plain matmuls at these lengths, and
    eager's (B, heads, T, T) activations are still small (benchmarks/attention_cpu.py)."""
