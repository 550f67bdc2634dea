"""Typed, frozen configuration of the online algorithms (GRPO, rejection sampling, iterative DPO).

Resolved once, in this order, and never mutated: field defaults -> training/configs/<algo>.toml ->
the user's TOML file -> `key=value` overrides (training.config_reader, the one config reader).
Unknown keys and ill-typed values are errors, every
cross-field rule is checked in `__post_init__` before a model is loaded, and the resolved config
is saved as `config.json` in the run folder.

    python -c "from training.online_config import load_online_config as l; \
print(l('grpo', None, ['prompts=p.jsonl', 'model=smollm2-135m-instruct', 'out=runs/g']))"
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from training.config import CONFIG_DIR
from training.config_reader import ConfigError, SavableConfig, resolve_fields
from training.loss_names import REFERENCE_BASED_PREFERENCE_LOSSES
from training.model_options import KernelOptions, ModelOptions

Algo = Literal["grpo", "rs", "online-dpo"]
ALGOS: tuple[str, ...] = get_args(Algo)


@dataclass(frozen=True)
class OnlineConfig(ModelOptions, KernelOptions, SavableConfig):
    """One `run_online` run. Units are in the field names."""

    # --- what to train ---------------------------------------------------------------------
    algo: Algo = "grpo"
    prompts: str = ""
    """JSONL, one {"prompt": str | [messages], "answer": str (optional), "id": str (optional)}."""
    model: str = ""
    """Starting policy: bundled name, local Hugging Face folder, or hub id."""
    out: str = ""
    """Run folder: config.json, run.json, metrics.jsonl, samples.jsonl, eval.jsonl, model/."""
    reward: str = "rule:format+accuracy"
    """Reward spec (training/rewards.py): rule:<checks>, rm:<path>, or a weighted mix."""
    eval_prompts: str = ""
    """Held-out prompts file, scored with greedy decoding before training and after it."""
    eval_every: int = 0
    """Also evaluate every N iterations (0: only before and after)."""
    eval_temperature: float = 0.0
    """0: greedy; > 0 scores the policy as it samples (seeded, the same draws before/after)."""
    eval_samples: int = 1
    """Samples per held-out prompt (with eval_temperature > 0)."""

    # --- rollouts --------------------------------------------------------------------------
    iterations: int = 4
    """Rollout -> score -> update rounds."""
    prompts_per_iteration: int = 8
    samples_per_prompt: int = 4
    """G (GRPO group size), n (best-of-n), K (online DPO)."""
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    include_stop: bool = True
    """Keep the stop string in the scored text (a closing </answer> tag the reward checks)."""
    rollout_engine: Literal["hf", "vllm"] = "hf"
    rollout_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto: bfloat16 where the CPU/GPU has bf16 matmuls (about 2x faster generation)."""
    rollout_batch_size: int = 64
    """Sequences decoded together by the HF engine."""
    rollout_actor: bool = True
    """Generate in a Ray actor (weights synced after every update); false: in this process."""
    rollout_threads: int = 0
    """torch threads of the rollout actor (0: all cores; learner and actor take turns)."""

    # --- GRPO ------------------------------------------------------------------------------
    clip_eps: float = 0.2
    kl_coef: float = 0.04
    """beta of the KL term to the reference (0: no reference model is used)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    scale_rewards: bool = True
    """Divide group-centred rewards by the group std (false: Dr. GRPO)."""
    loss_reduction: Literal["token", "sequence"] = "sequence"
    skip_uniform_groups: bool = True
    """Leave out groups whose samples all got the same reward (zero advantage): they only carry
    the KL term, and skipping them saves their forward and backward passes."""

    # --- rejection sampling ----------------------------------------------------------------
    rs_min_reward: float = 0.0
    """Keep a prompt's best sample only if its reward is at least this."""

    # --- iterative online DPO --------------------------------------------------------------
    pairs: Literal["best-worst", "all"] = "best-worst"
    reference: Literal["initial", "round-start"] = "initial"
    """DPO reference: the starting model, or the policy at the start of each iteration."""
    beta: float = 0.1
    loss_type: str = "sigmoid"
    min_reward_gap: float = 0.0
    """A pair needs reward(chosen) - reward(rejected) > this."""

    # --- optimisation ----------------------------------------------------------------------
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    """0 disables clipping."""
    epochs_per_iteration: int = 1
    """Passes over each iteration's data (GRPO's mu, the SFT / DPO epochs)."""
    train_batch_size: int = 0
    """Examples per optimizer step (GRPO: samples, rounded to whole groups; RS: samples; DPO:
    pairs); 0 = all of the iteration's examples in one step."""
    micro_batch_size: int = 8
    """Sequences per forward pass (memory); gradients are accumulated up to train_batch_size."""
    seed: int = 0

    # --- model and hardware (LoRA, device, precision, attention: training.model_options) ---
    progress: bool = True

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise ConfigError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        for name in ("prompts", "model", "out", "reward"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is required")
        for name in ("iterations", "prompts_per_iteration", "samples_per_prompt",
                     "max_new_tokens", "rollout_batch_size", "epochs_per_iteration",
                     "micro_batch_size", "lora_r", "lora_alpha", "eval_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "rollout_threads", "kl_coef", "weight_decay", "max_grad_norm",
                     "train_batch_size", "min_reward_gap", "lora_dropout", "temperature",
                     "eval_temperature"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("top_p must be in (0, 1]")
        if self.learning_rate <= 0 or self.beta <= 0 or self.clip_eps <= 0:
            raise ConfigError("learning_rate, beta and clip_eps must be > 0")
        if self.algo == "grpo" and self.samples_per_prompt < 2:
            raise ConfigError("GRPO compares samples within a group: samples_per_prompt >= 2")
        if self.algo == "online-dpo" and self.samples_per_prompt < 2:
            raise ConfigError("online DPO builds pairs: samples_per_prompt >= 2")
        if self.loss_type not in REFERENCE_BASED_PREFERENCE_LOSSES:
            raise ConfigError(f"loss_type must be one of {REFERENCE_BASED_PREFERENCE_LOSSES} "
                              f"(reference-based DPO losses), got {self.loss_type!r}")
        if self.algo != "rs" and self.temperature == 0:
            raise ConfigError(f"{self.algo} needs different samples per prompt: temperature > 0")
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must be non-empty")
        if not self.lora_target_modules:
            raise ConfigError("lora_target_modules must name at least one module")


def config_file(algo: str) -> Path:
    """The bundled defaults of an algorithm (online-dpo -> online_dpo.toml)."""
    return CONFIG_DIR / f"{algo.replace('-', '_')}.toml"


def load_online_config(algo: str, toml_path: str | Path | None,
                       overrides: typing.Sequence[str]) -> OnlineConfig:
    """Resolve an OnlineConfig from the bundled defaults, a TOML file and overrides.

    Raises:
        ConfigError: unknown key, wrong type, or an invalid combination.
    """
    if algo not in ALGOS:
        raise ConfigError(f"algo must be one of {ALGOS}, got {algo!r}")
    files = [path for path in (config_file(algo),) if path.exists()]
    if toml_path is not None:
        files.append(Path(toml_path))
    # No stripping of comma-separated list items: stop = " Q:" or "\n\n" must stay as written.
    return OnlineConfig(**resolve_fields(OnlineConfig, files, overrides, strip_lists=False,
                                         pin=("algo", algo, "the run")))


__all__ = ["ALGOS", "Algo", "OnlineConfig", "config_file", "load_online_config"]
