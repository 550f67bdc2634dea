"""Typed, frozen configuration of `prefloop train ppo` (RM + PPO, the InstructGPT recipe).

Resolved once, in this order, never mutated: field defaults -> `training/configs/ppo.toml` ->
`--config FILE.toml` -> `--set key=value` -> the command's flags (--prompts, --model, ...).
Unknown keys and ill-typed values are errors (training.config_reader); cross-field rules are
checked in `__post_init__`, before Ray starts or a model loads. The resolved config is saved as
`config.json` in the run dir.

    python -c "from training.ppo_config import load_ppo_config as l; print(l(None, \
['prompts=p.jsonl', 'model=smollm2-135m-instruct', 'reward=rule:format', 'out=runs/ppo']))"

Every PPO implementation detail of the issue is a field here (cf. OpenRLHF, Hu et al. 2024,
arXiv:2405.11143, "PPO implementation tricks"), so each can be switched off and tested alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from training.config import CONFIG_DIR
from training.config_reader import ConfigError, SavableConfig, build, resolve_fields
from training.model_options import ModelOptions

CONFIG_PATH = CONFIG_DIR / "ppo.toml"


class PPOConfigError(ConfigError):
    """A PPO configuration that cannot run (unknown key, wrong type, inconsistent values)."""


@dataclass(frozen=True)
class PPOConfig(ModelOptions, SavableConfig):
    """Everything one PPO run needs. Steps are PPO iterations (rollout + update) unless a field
    says optimizer steps."""

    # --- inputs and outputs ----------------------------------------------------------------
    prompts: str = ""
    """JSONL prompts: {"prompt": str | [messages], "answer": str (optional), "id": (optional)}."""
    model: str = ""
    """Initial policy (the actor), also the reference: bundled name, folder or hub id."""
    reward_model: str = ""
    """A reward-model folder from `prefloop train rm`; scored on token ids (see reward_on_eos)."""
    reward: str = ""
    """A reward spec for training.rewards.make_reward ("rule:format", "rm:PATH*0.5,rule:..."),
    used instead of reward_model (give one of the two)."""
    critic_init: str = ""
    """Critic weights: empty = the reward model when there is one (OpenRLHF's default), else the
    policy (with a fresh value head)."""
    out: str = ""
    """Run directory: config.json, run.json, metrics.jsonl, rollouts/, checkpoints/, model/."""

    # --- rollouts --------------------------------------------------------------------------
    steps: int = 20
    """PPO iterations: each generates a batch, scores it and updates critic (and actor)."""
    rollout_batch_size: int = 8
    """Prompts per iteration."""
    samples_per_prompt: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    """Sampling temperature; the PPO log-probs use the same temperature-scaled logits."""
    top_p: float = 1.0
    max_prompt_tokens: int = 512
    """Prompts longer than this (after the chat template) are skipped and counted."""
    generation_batch_size: int = 16
    rollout_engine: Literal["hf", "vllm"] = "hf"

    # --- rewards and KL ---------------------------------------------------------------------
    reward_on_eos: bool = True
    """The reward model reads its score at an end-of-text token: EOS is appended to generations
    cut at max_new_tokens, as in RM training. False: score the last generated token as is."""
    normalize_reward: bool = True
    """Divide scores by running reward statistics (RunningMoments) before the KL penalty."""
    reward_clip: float = 0.0
    """Clip (normalised) scores to [-reward_clip, reward_clip]; 0 = off."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL(pi || pi_ref) estimator in the token rewards (Schulman 2020)."""
    kl_coef: float = 0.01
    """Initial KL coefficient beta."""
    kl_controller: Literal["fixed", "adaptive"] = "fixed"
    """adaptive = Ziegler et al. 2019 proportional controller toward kl_target."""
    kl_target: float = 6.0
    kl_horizon: int = 10000

    # --- advantages and losses --------------------------------------------------------------
    advantage_estimator: Literal["gae", "reinforce"] = "gae"
    """gae = GAE(gamma, lam) with the critic (Schulman et al. 2016); reinforce = discounted
    returns-to-go, no critic baseline (the critic is still trained, for comparison)."""
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    """Whiten advantages with the mean/variance of the whole batch, combined across actor
    workers (not per worker)."""
    policy_clip_eps: float = 0.2
    """PPO ratio clip (Schulman et al. 2017, Eq. 7); 0 = unclipped importance-weighted PG."""
    value_clip_eps: float = 0.2
    """Clip the new value around the rollout value; 0 = plain squared error."""
    ppo_epochs: int = 1
    mini_batch_size: int = 8
    """Sequences per optimizer step (summed over actor workers)."""
    ptx_data: str = ""
    """PPO-ptx: an SFT JSONL ({"prompt", "completion"}) whose NLL is added to the actor loss."""
    ptx_coef: float = 0.0
    ptx_scale: Literal["fixed", "relative"] = "relative"
    """fixed: loss = pg + ptx_coef * sft. relative: the SFT term is rescaled to ptx_coef times the
    magnitude of the policy loss (|pg| / sft, detached), so ptx_coef is a ratio."""
    ptx_batch_size: int = 4

    # --- optimisation -----------------------------------------------------------------------
    actor_lr: float = 1e-6
    critic_lr: float = 1e-5
    """The critic learns faster than the actor (OpenRLHF: 5e-7 vs 9e-6)."""
    warmup_steps: int = 0
    """Linear warmup, in optimizer steps, then lr_schedule."""
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    min_lr_ratio: float = 0.1
    """Cosine decays to min_lr_ratio * lr."""
    freeze_actor_steps: int = 0
    """PPO iterations in which only the critic trains (value warm-up); the actor LR schedule
    starts after them."""
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    """0 disables clipping."""
    seed: int = 0

    # --- models and hardware (LoRA and device: training.model_options) --------------------

    # --- Ray placement ----------------------------------------------------------------------
    actor_workers: int = 1
    """Data-parallel actor workers (gradients all-reduced with torch.distributed)."""
    colocate_actor_ref: bool = False
    """Host the reference in the actor worker's process (one Ray actor for both roles)."""
    colocate_critic_reward: bool = False
    """Host the reward model in the critic's process."""
    cpus_per_worker: float = 0.5
    """Ray CPU resource per worker (fractional, so four roles fit on a 2-CPU local Ray)."""
    gpus_per_worker: float = 0.0
    threads_per_worker: int = 0
    """torch threads inside each worker; 0 = torch's default."""
    max_step_retries: int = 0
    """When a role dies mid-step: 0 = fail loudly (resume from the last checkpoint); N = restart
    the dead roles, restore every role from the last checkpoint and replay, at most N times."""

    # --- bookkeeping ------------------------------------------------------------------------
    save_steps: int = 10
    """Checkpoint every N PPO iterations (0 = only at the end)."""
    keep_checkpoints: int = 2
    log_rollouts: bool = True
    """Write rollouts/step-N.pt (ids, log-probs, values, rewards, advantages) and samples.jsonl."""
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("prompts", "model", "out"):
            if not getattr(self, name):
                raise PPOConfigError(f"{name} is required")
        if bool(self.reward_model) == bool(self.reward):
            raise PPOConfigError("give exactly one reward source: --reward-model RM, or "
                                 "reward=SPEC (a composition may include rm:PATH)")
        positive = ("steps", "rollout_batch_size", "samples_per_prompt", "max_new_tokens",
                    "max_prompt_tokens", "generation_batch_size", "ppo_epochs",
                    "mini_batch_size", "ptx_batch_size", "lora_r", "lora_alpha",
                    "actor_workers", "keep_checkpoints", "kl_horizon")
        for name in positive:
            if getattr(self, name) < 1:
                raise PPOConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        non_negative = ("kl_coef", "kl_target", "policy_clip_eps", "value_clip_eps", "ptx_coef",
                        "warmup_steps", "freeze_actor_steps", "weight_decay", "max_grad_norm",
                        "lora_dropout", "cpus_per_worker", "gpus_per_worker",
                        "threads_per_worker", "max_step_retries", "save_steps", "reward_clip")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise PPOConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.actor_lr <= 0 or self.critic_lr <= 0:
            raise PPOConfigError("actor_lr and critic_lr must be > 0")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise PPOConfigError("temperature must be > 0 and top_p in (0, 1]")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise PPOConfigError("gamma and lam must be in [0, 1]")
        if not 0 <= self.min_lr_ratio <= 1:
            raise PPOConfigError("min_lr_ratio must be in [0, 1]")
        if self.freeze_actor_steps >= self.steps:
            raise PPOConfigError(f"freeze_actor_steps={self.freeze_actor_steps} leaves no actor "
                                 f"update in steps={self.steps}")
        batch = self.batch_sequences
        if self.rollout_batch_size % self.actor_workers:
            raise PPOConfigError(f"rollout_batch_size={self.rollout_batch_size} prompts must "
                                 f"divide evenly among actor_workers={self.actor_workers}")
        if batch % self.mini_batch_size or self.mini_batch_size % self.actor_workers:
            raise PPOConfigError(f"mini_batch_size={self.mini_batch_size} must divide the "
                                 f"rollout batch ({batch} sequences) and be a multiple of "
                                 f"actor_workers={self.actor_workers}")
        if bool(self.ptx_data) != (self.ptx_coef > 0):
            raise PPOConfigError("PPO-ptx needs both ptx_data and ptx_coef > 0")
        if not self.lora_target_modules:
            raise PPOConfigError("lora_target_modules must name at least one module")

    @property
    def batch_sequences(self) -> int:
        """Sequences generated per PPO iteration."""
        return self.rollout_batch_size * self.samples_per_prompt

    @property
    def updates_per_step(self) -> int:
        """Optimizer steps per PPO iteration (for each of actor and critic)."""
        return self.ppo_epochs * (self.batch_sequences // self.mini_batch_size)

    @property
    def reward_spec(self) -> str:
        return self.reward or f"rm:{self.reward_model}"

    @property
    def critic_source(self) -> str:
        return self.critic_init or self.reward_model or self.model


def load_ppo_config(toml_path: Path | str | None, overrides: list[str]) -> PPOConfig:
    """Resolve a PPOConfig from the bundled defaults, a TOML file and `key=value` overrides.

    Raises:
        PPOConfigError: unknown key, wrong type, or an invalid combination.
    """
    files = [CONFIG_PATH] if toml_path is None else [CONFIG_PATH, Path(toml_path)]
    return PPOConfig(**resolve_fields(PPOConfig, files, overrides, PPOConfigError))


def ppo_config_from_dict(data: dict[str, Any]) -> PPOConfig:
    """Rebuild a PPOConfig from a saved config.json (type-checked like any other input)."""
    return cast(PPOConfig, build(PPOConfig, data, PPOConfigError))


__all__ = ["PPOConfig", "PPOConfigError", "load_ppo_config", "ppo_config_from_dict"]
