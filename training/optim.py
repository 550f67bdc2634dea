"""Optimisation shared by every trainer: the learning-rate schedule and one clipped optimizer step.

The offline loop (training.trainer), the online learner (training.learner) and the PPO actor and
critic (training.ppo_roles) all step AdamW the same way: clip the gradient norm, step, advance
the LR schedule, clear the gradients.

    python -c "from training.optim import lr_factor; \
print([lr_factor(s, warmup_steps=2, total_steps=10, schedule='cosine') for s in range(4)])"
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str,
              min_lr_ratio: float = 0.0) -> float:
    """The LR multiplier after `step` optimizer steps.

    Linear warmup from lr/(warmup+1) to lr, then constant, linear decay or cosine decay down to
    min_lr_ratio * lr (Loshchilov & Hutter 2017, SGDR Eq. 5 without restarts; OpenRLHF's
    cosine_with_min_lr). With min_lr_ratio = 0 the decays end at 0.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return min_lr_ratio + (1.0 - min_lr_ratio) * max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (
            1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"unknown lr schedule {schedule!r}")


def lr_schedule(*, warmup_steps: int, total_steps: int, schedule: str,
                min_lr_ratio: float = 0.0) -> Callable[[int], float]:
    """lr_factor as the one-argument function torch's LambdaLR takes."""
    return lambda step: lr_factor(step, warmup_steps=warmup_steps, total_steps=total_steps,
                                  schedule=schedule, min_lr_ratio=min_lr_ratio)


def optimizer_step(trainable: list[Any], optimizer: Any, max_grad_norm: float,
                   scheduler: Any = None) -> float:
    """Clip the gradients (max_grad_norm <= 0: no clipping), step the optimizer and the LR
    schedule, clear the gradients; returns the gradient norm before clipping."""
    import torch

    limit = max_grad_norm if max_grad_norm > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, limit))
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


__all__ = ["lr_factor", "lr_schedule", "optimizer_step"]
