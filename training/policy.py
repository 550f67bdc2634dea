"""Building the model to train, for every trainer: load it, wrap it in LoRA, freeze a reference.

`lora = "auto"` means LoRA on CPU and full fine-tuning on GPU in every config (TrainConfig,
OnlineConfig, PPOConfig); the LoRA target modules are checked against the model so a typo is a
clear error instead of an adapter that trains nothing.

    python -c "import torch; from training.policy import uses_lora; \
print(uses_lora('auto', torch.device('cpu')))"
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from training.config_reader import ConfigError

if TYPE_CHECKING:
    import torch

TaskType = Literal["CAUSAL_LM", "SEQ_CLS"]


class LoraFields(Protocol):
    """The LoRA fields every training config has."""

    @property
    def lora(self) -> str: ...
    @property
    def lora_r(self) -> int: ...
    @property
    def lora_alpha(self) -> int: ...
    @property
    def lora_dropout(self) -> float: ...
    @property
    def lora_target_modules(self) -> tuple[str, ...]: ...


def uses_lora(choice: str, device: torch.device) -> bool:
    """`lora = "on" | "off" | "auto"`; auto = LoRA on CPU, full fine-tuning on GPU."""
    return choice == "on" or (choice == "auto" and device.type == "cpu")


def check_lora_targets(model: Any, targets: tuple[str, ...],
                       error: type[Exception] = ConfigError) -> None:
    """Raise `error` if a LoRA target module name does not occur in the model."""
    import torch

    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in leaves]
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear)})
        raise error(f"LoRA target module(s) {missing} not found in the model; "
                    f"its linear layers are named {linear}")


def with_lora(model: Any, config: LoraFields, task_type: TaskType,
              error: type[Exception] = ConfigError) -> Any:
    """The model wrapped in a PEFT LoRA adapter as the config describes (SEQ_CLS keeps a scalar
    model's new `score` head fully trainable)."""
    from peft import LoraConfig, get_peft_model

    check_lora_targets(model, config.lora_target_modules, error)
    return get_peft_model(model, LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules), task_type=task_type))


def load_causal_lm(name_or_path: str, attention: str) -> Any:
    """A causal LM in fp32 (the master weights; bf16 runs under autocast) with the given
    attention kernel (training.runtime.attention_implementation)."""
    import torch
    from transformers import AutoModelForCausalLM

    from training.models import load_adapter, resolve_model

    path = resolve_model(name_or_path)
    if (Path(path) / "adapter_config.json").is_file():  # start from a saved LoRA run: merged
        return load_adapter(path, AutoModelForCausalLM, dtype=torch.float32,
                            attn_implementation=attention)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                attn_implementation=attention)


def is_peft(model: Any) -> bool:
    """A PEFT model: its adapter can be switched off, which gives back the base model."""
    return hasattr(model, "disable_adapter")


def freeze(model: Any) -> Any:
    """The model with no parameter requiring a gradient (a reference policy)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def hold_frozen_linears_in_bf16(model: Any) -> int:
    """Store the frozen fp32 weights of the model's linear layers (a LoRA model's base) in bf16,
    for training under bf16 autocast; returns how many were converted.

    Why: autocast caches its fp32 -> bf16 weight casts only for tensors that require grad, so a
    frozen base weight is cast again at every call, forward and backward (a SmolLM2 reference
    micro-batch of 8 pairs: 0.28 s of copies in 1.06 s). Autocast would compute the same bf16
    values, so the losses and gradients stay the same. Weights shared with an embedding (a tied
    output layer) stay fp32: the embedding lookup is not autocast and would hand bf16 to the
    residual stream. Run the model under bf16 autocast afterwards only; saved adapters are
    unaffected (PEFT saves the adapter, and merges load the base from its folder)."""
    import torch

    embedding_weights = {id(m.weight) for m in model.modules()
                         if isinstance(m, torch.nn.Embedding)}
    converted = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        weight = module.weight
        if (weight.requires_grad or weight.dtype != torch.float32
                or id(weight) in embedding_weights):
            continue
        weight.data = weight.data.to(torch.bfloat16)
        converted += 1
    return converted


def trainable_parameters(model: Any) -> list[Any]:
    return [p for p in model.parameters() if p.requires_grad]


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """A CPU copy of the trainable weights (the LoRA adapter, or every weight), for checkpoints."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


__all__ = ["LoraFields", "TaskType", "check_lora_targets", "freeze", "hold_frozen_linears_in_bf16",
           "is_peft", "load_causal_lm", "trainable_parameters", "trainable_state", "uses_lora",
           "with_lora"]
