"""Typed, frozen training configuration of `prefloop train {sft,rm,dpo,kto}`.

A run is described by one `TrainConfig`. It is resolved once, in this order, and never mutated:
field defaults -> `training/configs/<mode>.toml` -> the user's `--config FILE.toml` -> `--set k=v`
overrides. Unknown keys and ill-typed values are errors (training.config_reader, the one config
reader), and every cross-field rule is checked in `__post_init__`, before any model is loaded.
The resolved config is saved as `config.json` beside the run's outputs. The loss names are the
one list of training.loss_names.

    python -c "from training.config import load_config; print(load_config('dpo', None, \
['data=x.jsonl', 'model=smollm2-135m-instruct', 'out=runs/x', 'beta=0.2']))"
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args

from training import loss_names
from training.config_reader import ConfigError, SavableConfig, build, resolve_fields
from training.loss_names import LOSS_TYPES
from training.model_options import KernelOptions, ModelOptions

Mode = Literal["sft", "rm", "dpo", "kto"]
MODES: tuple[str, ...] = get_args(Mode)
CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class TrainConfig(ModelOptions, KernelOptions, SavableConfig):
    """Everything one `prefloop train MODE` run needs. Units are in the field names."""

    # --- what to train ---------------------------------------------------------------------
    mode: Mode = "dpo"
    data: str = ""
    """Export file (JSONL) from `prefloop export`; `FILE.manifest.json` is verified if present."""
    model: str = ""
    """Bundled name (`smollm2-135m-instruct`), a local Hugging Face folder, or a hub id."""
    out: str = ""
    """Run directory: config.json, run.json, metrics.jsonl, model/ and checkpoints/."""
    ref_model: str = "initial"
    """Reference policy: "initial" (the starting policy, frozen), "none", or a model name/path."""

    # --- the loss --------------------------------------------------------------------------
    loss_type: str = ""
    """Empty = the mode's default (see LOSS_TYPES)."""
    beta: float = 0.1
    """KL strength (DPO family, KTO); SimPO's reward scale."""
    label_smoothing: float = 0.0
    """Assumed label-flip rate for cdpo / robust, in [0, 0.5)."""
    simpo_gamma: float = 0.5
    """SimPO target reward margin."""
    rdpo_alpha: float = 0.0
    """R-DPO length-penalty coefficient (per token)."""
    orpo_lambda: float = 0.1
    """ORPO weight of the odds-ratio term."""
    desirable_weight: float = 1.0
    """KTO lambda_D."""
    undesirable_weight: float = 1.0
    """KTO lambda_U."""
    conditional_sft: bool = False
    """SFT on labelled rows with a reward tag prepended to the prompt (Conditional SFT)."""

    # --- data ------------------------------------------------------------------------------
    max_length: int = 512
    """Longest prompt+completion in tokens."""
    overlong: Literal["truncate", "skip"] = "truncate"
    """What to do with rows longer than max_length (counted and reported either way)."""

    # --- optimisation ----------------------------------------------------------------------
    batch_size: int = 4
    """Examples (pairs for dpo/rm) per micro-batch."""
    grad_accum_steps: int = 1
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    fused_optimizer: bool = True
    """AdamW's fused kernel (one pass over all parameters, on CPU too; transformers' Trainer uses
    it by default from torch 2.8). false = torch's per-parameter loop. Ignored under DeepSpeed."""
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "linear", "cosine"] = "linear"
    max_grad_norm: float = 1.0
    """0 disables clipping."""
    epochs: int = 1
    max_steps: int = 0
    """Optimizer steps; 0 = epochs * (examples // optimizer batch, rounded up)."""
    seed: int = 0

    # --- model and hardware (LoRA, device, precision, attention: training.model_options) ---
    gradient_checkpointing: bool = False
    precompute_ref_logps: bool = True
    """Reference log-probs computed once per dataset (cached in the run dir) instead of per step."""
    deepspeed: Literal["none", "zero1", "zero2", "zero3"] = "none"
    share_prompt: bool = True
    """dpo: run each prompt once per pair through the KV cache (ignored with gradient checkpointing,
    which disables the cache)."""

    # --- bookkeeping -----------------------------------------------------------------------
    save_steps: int = 50
    """Write a resumable checkpoint every N optimizer steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    logging_steps: int = 1
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.loss_type:
            object.__setattr__(self, "loss_type", LOSS_TYPES[self.mode][0])
        allowed = LOSS_TYPES[self.mode]
        if self.loss_type not in allowed:
            raise ConfigError(f"loss_type={self.loss_type!r} is not valid for mode {self.mode!r}; "
                              f"choose one of {allowed}")
        for name in ("data", "model", "out"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is required")
        if self.needs_reference and self.ref_model == "none":
            raise ConfigError(f"loss_type={self.loss_type!r} compares the policy with a reference "
                              "model, but ref_model='none'; use 'initial' or a model path")
        positive = ("max_length", "batch_size", "grad_accum_steps", "epochs", "lora_r",
                    "lora_alpha", "logging_steps", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "save_steps", "warmup_steps", "weight_decay", "max_grad_norm",
                     "desirable_weight", "undesirable_weight", "rdpo_alpha", "lora_dropout"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError("label_smoothing must be in [0, 0.5)")
        if self.beta <= 0 or self.learning_rate <= 0:
            raise ConfigError("beta and learning_rate must be > 0")
        if self.conditional_sft and self.mode != "sft":
            raise ConfigError("conditional_sft applies to mode 'sft' only")
        if not self.lora_target_modules:
            raise ConfigError("lora_target_modules must name at least one module")

    @property
    def needs_reference(self) -> bool:
        """True when the loss compares the policy with a frozen reference policy."""
        return loss_names.needs_reference(self.loss_type)


def load_config(mode: str, toml_path: Path | None, overrides: list[str]) -> TrainConfig:
    """Resolve a TrainConfig for `mode` from the bundled defaults, a TOML file and overrides.

    Args:
        mode: sft, rm, dpo or kto.
        toml_path: optional user TOML file with flat `key = value` entries.
        overrides: `key=value` strings (the CLI's `--set`, plus data/model/out/deepspeed/resume).

    Raises:
        ConfigError: unknown key, wrong type, or an invalid combination.
    """
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    files = [path for path in (CONFIG_DIR / f"{mode}.toml",) if path.exists()]
    if toml_path is not None:
        files.append(Path(toml_path))
    return TrainConfig(**resolve_fields(TrainConfig, files, overrides,
                                        pin=("mode", mode, "the command")))


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from a saved config.json (type-checked like any other input)."""
    return cast(TrainConfig, build(TrainConfig, data, ConfigError))


__all__ = ["CONFIG_DIR", "MODES", "Mode", "TrainConfig", "config_from_dict", "load_config"]
