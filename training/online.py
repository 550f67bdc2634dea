"""Online RL without a critic: GRPO, rejection sampling (best-of-n + SFT), iterative online DPO.

Each iteration reads like a recipe: take the next prompts -> the rollout engine (a Ray actor)
samples several completions per prompt -> the reward source scores them -> the learner (this
process) updates the policy -> the new weights are pushed to the rollout actor.

- GRPO (Shao et al. 2024, DeepSeekMath, Sec. 4.1; DeepSeek-AI 2025, R1): G samples per prompt,
  group-normalised advantages (optionally without the std, Dr. GRPO), PPO's clipped ratio, a k3
  KL term to the reference, no critic; default reward = rule format + accuracy.
- Rejection sampling (best-of-n, as in Llama 2, Touvron et al. 2023, Sec. 3.2.3): n samples per
  prompt, the best one kept if good enough, supervised fine-tuning on the kept ones.
- Iterative online DPO (Xiong et al. 2024; Guo et al. 2024): K samples per prompt from the current
  policy, scored; pairs best-vs-worst (or all ordered pairs), DPO (training.losses) against the
  initial model or the iteration's starting policy.

    python -c "from training.online import run_online; run_online('grpo', \
prompts='prompts.jsonl', model='smollm2-135m-instruct', out='runs/grpo1')"

The run folder holds config.json (frozen), run.json, metrics.jsonl (one line per iteration),
samples.jsonl (every scored sample), eval.jsonl (held-out generations) and model/ (a FULL
Hugging Face folder; LoRA adapters are merged, see training.models.merge_adapter).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import platform
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from training.config import ConfigError
from training.online_config import Algo, OnlineConfig, load_online_config
from training.rewards import RewardFn, make_reward
from training.rollout import Prompt, Rollout, RolloutEngine, SamplingParams

if TYPE_CHECKING:
    import torch


class OnlineDataError(ValueError):
    """A prompts file that cannot be used (with the line number of the problem)."""


@dataclass(frozen=True)
class OnlineResult:
    """What a finished online run produced."""

    run_dir: Path
    model_dir: Path
    """A FULL Hugging Face model folder (tokenizer included), LoRA merged."""
    steps: int
    """Optimizer steps taken."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The last iteration's metrics plus eval/reward_before and eval/reward_after."""


@dataclass(frozen=True)
class PromptRow:
    prompt: Prompt
    answer: str | None
    id: str


IterationCallback = Callable[[int, dict[str, float]], None]


# ----------------------------------------------------------------------------- input


def read_prompts(path: str) -> list[PromptRow]:
    """Read and validate a prompts JSONL file; every problem is reported with its line."""
    file = Path(path)
    if not file.is_file():
        raise OnlineDataError(f"prompts file {path} does not exist")
    rows: list[PromptRow] = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise OnlineDataError(f"{path}:{number}: not JSON ({err.msg})") from None
        if not isinstance(obj, dict) or "prompt" not in obj:
            raise OnlineDataError(f"{path}:{number}: expected an object with a 'prompt'")
        prompt = obj["prompt"]
        is_chat = isinstance(prompt, list) and bool(prompt) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in prompt)
        if not (isinstance(prompt, str) and prompt) and not is_chat:
            raise OnlineDataError(f"{path}:{number}: 'prompt' must be a non-empty string or a "
                                  "list of {role, content} messages")
        answer = obj.get("answer")
        if answer is not None and not isinstance(answer, str | int | float):
            raise OnlineDataError(f"{path}:{number}: 'answer' must be a string")
        rows.append(PromptRow(prompt, None if answer is None else str(answer),
                              str(obj.get("id", number))))
    if not rows:
        raise OnlineDataError(f"{path} holds no prompts")
    return rows


def prompt_order(num_prompts: int, seed: int) -> Iterator[int]:
    """Prompt indices in a seeded order, reshuffled at every pass over the file."""
    epoch = 0
    while True:
        order = list(range(num_prompts))
        random.Random(f"{seed}-{epoch}").shuffle(order)
        yield from order
        epoch += 1


# ----------------------------------------------------------------------------- log-probs


def grouped_completion_logps(
    model: Any,
    prompts: Sequence[list[int]],
    completions: Sequence[list[int]],
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of K completions per prompt, each prompt run through the model once.

    Collates the id lists for training.logprobs.shared_prompt_pair_logps (prompt prefilled once,
    its KV cache repeated K times, gradients flowing through it), with the logits divided by the
    sampling temperature, so that the learner's log-probs match the distribution the rollouts were
    drawn from.

    Args:
        model: a causal LM.
        prompts: B prompt id lists.
        completions: B*K completion id lists, prompt-major (row b*K + j: sample j of prompt b).
        temperature: the sampling temperature (1 for greedy-sampled data).

    Returns:
        (per_token (B*K, C) log-probs, 0 off the mask; mask (B*K, C) float).
    """
    from training.data import collate_shared_prompts
    from training.logprobs import shared_prompt_pair_logps

    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in
             collate_shared_prompts(list(prompts), list(completions), pad_id=0).items()}
    out = shared_prompt_pair_logps(model, batch["prompt_ids"], batch["prompt_mask"],
                                   batch["completion_ids"], batch["completion_mask"],
                                   temperature=temperature)
    return out.per_token, out.mask


# ----------------------------------------------------------------------------- the learner


class Learner:
    """The policy being trained (LoRA on CPU by default), its optimizer and its reference."""

    def __init__(self, config: OnlineConfig, needs_reference: bool,
                 prompts: Sequence[Any] = ()):
        """prompts: the run's prompts; their longest encoding plus max_new_tokens decides the
        attention kernel under `attention = "auto"`."""
        import torch
        from transformers import AutoModelForCausalLM

        from training.models import load_tokenizer, resolve_model
        from training.rollout import encode_prompt
        from training.trainer import (
            attention_implementation,
            bf16_supported,
            check_lora_targets,
            select_device,
        )

        self.config = config
        self.device = select_device(config.device)
        self.bf16 = config.precision == "bf16" or (config.precision == "auto"
                                                   and bf16_supported(self.device))
        self.tokenizer = load_tokenizer(config.model)
        torch.manual_seed(config.seed)
        longest = max((len(encode_prompt(self.tokenizer, p)) for p in prompts), default=0)
        self.attention = attention_implementation(config.attention, self.device,
                                                  longest + config.max_new_tokens)
        model: Any = AutoModelForCausalLM.from_pretrained(
            resolve_model(config.model), dtype=torch.float32, attn_implementation=self.attention)
        self.lora = config.lora == "on" or (config.lora == "auto" and self.device.type == "cpu")
        self.reference_model: Any = None
        if self.lora:
            from peft import LoraConfig, get_peft_model

            check_lora_targets(model, config.lora_target_modules)
            model = get_peft_model(model, LoraConfig(
                r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                target_modules=list(config.lora_target_modules), task_type="CAUSAL_LM"))
        elif needs_reference:
            # Full fine-tuning: the initial model is kept as a frozen copy. (With LoRA the
            # reference is the base model with the adapter switched off: no second copy.)
            self.reference_model = copy.deepcopy(model).eval().to(self.device)
            for p in self.reference_model.parameters():
                p.requires_grad_(False)
        self.model = model.to(self.device)
        self.model.train()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.learning_rate,
                                           weight_decay=config.weight_decay)
        self.steps = 0

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        import torch

        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    @contextlib.contextmanager
    def initial_policy(self) -> Iterator[Any]:
        """The starting model, frozen: LoRA switched off, or the kept copy."""
        if self.lora:
            was_training = self.model.training
            self.model.eval()
            with self.model.disable_adapter():
                yield self.model
            self.model.train(was_training)
        else:
            yield self.reference_model

    def logps(self, model: Any, prompts: Sequence[list[int]], completions: Sequence[list[int]],
              temperature: float, *, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        context = contextlib.nullcontext() if grad else torch.no_grad()
        with context, self.autocast():
            per_token, mask = grouped_completion_logps(model, prompts, completions, temperature)
        return per_token.float(), mask

    def step(self) -> float:
        """Clip, apply and clear the accumulated gradient; returns the gradient norm."""
        import torch

        limit = self.config.max_grad_norm if self.config.max_grad_norm > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, limit))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return norm

    def weights_for_sync(self, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        from training.rollout import policy_weights_for_sync

        return policy_weights_for_sync(self.model, dtype=dtype)

    def save_full_model(self, run_dir: Path) -> Path:
        """Write run_dir/model as a FULL model folder (LoRA merged into a fresh model)."""
        from training.models import merge_adapter

        final = run_dir / "model"
        if self.lora:
            adapter = run_dir / "adapter"
            shutil.rmtree(adapter, ignore_errors=True)
            self.model.save_pretrained(adapter)
            self.tokenizer.save_pretrained(adapter)
            return merge_adapter(adapter, final)
        tmp = run_dir / ".tmp-model"
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final


# ----------------------------------------------------------------------------- batching helpers


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + max(1, size)]


@dataclass
class Group:
    """The scored samples of one prompt in one iteration."""

    row: PromptRow
    dataset_index: int
    rollouts: list[Rollout]
    rewards: list[float]

    @property
    def prompt_ids(self) -> list[int]:
        return self.rollouts[0].prompt_ids


# ----------------------------------------------------------------------------- GRPO


def grpo_update(learner: Learner, groups: list[Group], config: OnlineConfig,
                sample_log: dict[tuple[int, int], dict[str, Any]]) -> dict[str, float]:
    """Clipped, group-relative policy updates on one iteration's groups (no critic).

    Shao et al. 2024, Eq. 3 with outcome supervision (Sec. 4.1.2): every token of sample i gets
    the advantage A_i of its group; the KL to the reference uses the k3 estimator (Eq. 4).
    """
    import torch

    from training.rl_losses import clipped_policy_loss, group_advantages, kl_penalty

    G = config.samples_per_prompt
    rewards = torch.tensor([r for g in groups for r in g.rewards])
    advantages = group_advantages(rewards, G, scale_by_std=config.scale_rewards).view(-1, G)
    kept = [i for i, g in enumerate(groups)
            if not (config.skip_uniform_groups and max(g.rewards) == min(g.rewards))]
    stats = {"train/groups_used": float(len(kept)), "train/loss": 0.0, "train/kl": 0.0,
             "train/clip_fraction": 0.0, "train/grad_norm": 0.0, "train/steps": 0.0}
    if not kept:
        return stats
    groups_per_micro = max(1, config.micro_batch_size // G)
    groups_per_step = len(kept) if config.train_batch_size == 0 else max(
        1, config.train_batch_size // G)
    single_pass = config.epochs_per_iteration == 1 and groups_per_step >= len(kept)

    def tensors_of(indices: Sequence[int]) -> tuple[list[list[int]], list[list[int]]]:
        prompts = [groups[i].prompt_ids for i in indices]
        completions = [r.completion_ids for i in indices for r in groups[i].rollouts]
        return prompts, completions

    def stacked(key: str, indices: Sequence[int], width: int) -> torch.Tensor:
        # Fixed log-probs were computed in other micro-batches (other padding): re-pad.
        out = torch.zeros((len(indices) * G, width))
        for k, i in enumerate(indices):
            values = fixed[i][key][:, :width]
            out[k * G : (k + 1) * G, : values.shape[1]] = values
        return out

    # Log-probs that stay fixed during the iteration's updates: the reference's and, when the
    # batch is used for more than one optimizer step, the sampling policy's ("old") ones.
    fixed: dict[int, dict[str, torch.Tensor]] = {i: {} for i in kept}
    temperature = config.temperature
    for micro in _chunks(kept, groups_per_micro):
        prompts, completions = tensors_of(micro)
        if config.kl_coef > 0:
            with learner.initial_policy() as reference:
                ref, _ = learner.logps(reference, prompts, completions, temperature, grad=False)
            for k, i in enumerate(micro):
                fixed[i]["ref"] = ref[k * G : (k + 1) * G]
        if not single_pass:
            old, _ = learner.logps(learner.model, prompts, completions, temperature, grad=False)
            for k, i in enumerate(micro):
                fixed[i]["old"] = old[k * G : (k + 1) * G]

    totals = {"loss": 0.0, "kl": 0.0, "clip": 0.0, "norm": 0.0, "tokens": 0.0}
    steps = 0
    for _epoch in range(config.epochs_per_iteration):
        for step_groups in _chunks(kept, groups_per_step):
            step_tokens = sum(len(r.completion_ids) for i in step_groups
                              for r in groups[i].rollouts)
            step_sequences = len(step_groups) * G
            for micro in _chunks(step_groups, groups_per_micro):
                prompts, completions = tensors_of(micro)
                logp, mask = learner.logps(learner.model, prompts, completions, temperature,
                                           grad=True)
                width = logp.shape[1]
                old = logp.detach() if single_pass else stacked("old", micro, width)
                adv = torch.cat([advantages[i] for i in micro]).unsqueeze(1).expand_as(logp)
                loss, clip_fraction = clipped_policy_loss(logp, old, adv, mask, config.clip_eps,
                                                          reduction=config.loss_reduction)
                kl_value = torch.zeros(())
                if config.kl_coef > 0:
                    ref = stacked("ref", micro, width)
                    per_token_kl = kl_penalty(logp, ref, config.kl_estimator)
                    if config.loss_reduction == "token":
                        kl_value = (per_token_kl * mask).sum() / mask.sum().clamp(min=1)
                    else:
                        kl_value = ((per_token_kl * mask).sum(-1)
                                    / mask.sum(-1).clamp(min=1)).mean()
                    loss = loss + config.kl_coef * kl_value
                # Each micro-batch's mean is re-weighted by its share of the optimizer batch, so
                # accumulation gives the gradient of the mean over the whole batch.
                share = (float(mask.sum()) / step_tokens if config.loss_reduction == "token"
                         else len(completions) / step_sequences)
                (loss * share).backward()
                totals["loss"] += float(loss.detach()) * share
                totals["kl"] += float(kl_value.detach()) * share
                totals["clip"] += float(clip_fraction) * share
                if _epoch == 0:  # what the learner saw, per sample, for the samples log
                    for k, i in enumerate(micro):
                        for j in range(G):
                            record = sample_log[(i, j)]
                            record["advantage"] = float(advantages[i, j])
                            record["learner_logp"] = float(logp[k * G + j].detach().sum())
                            if "ref" in fixed[i]:
                                record["ref_logp"] = float(fixed[i]["ref"][j].sum())
            totals["norm"] += learner.step()
            steps += 1
    stats.update({"train/loss": totals["loss"] / steps, "train/kl": totals["kl"] / steps,
                  "train/clip_fraction": totals["clip"] / steps,
                  "train/grad_norm": totals["norm"] / steps, "train/steps": float(steps)})
    return stats


# ----------------------------------------------------------------------------- rejection sampling


def best_of_n(groups: list[Group], min_reward: float) -> list[tuple[int, int]]:
    """(group, sample) of each prompt's highest-reward sample (first on ties), if >= min_reward."""
    chosen = []
    for i, group in enumerate(groups):
        best = max(range(len(group.rewards)), key=lambda j: (group.rewards[j], -j))
        if group.rewards[best] >= min_reward:
            chosen.append((i, best))
    return chosen


def rs_update(learner: Learner, groups: list[Group], config: OnlineConfig,
              sample_log: dict[tuple[int, int], dict[str, Any]]) -> dict[str, float]:
    """Supervised fine-tuning on the best sample of each prompt (completion-only NLL)."""
    from training.losses import sft_loss

    chosen = best_of_n(groups, config.rs_min_reward)
    for i, j in chosen:
        sample_log[(i, j)]["selected"] = True
    stats = {"train/examples": float(len(chosen)), "train/loss": 0.0, "train/grad_norm": 0.0,
             "train/steps": 0.0}
    if not chosen:
        return stats
    per_step = len(chosen) if config.train_batch_size == 0 else config.train_batch_size
    loss_sum = norm_sum = 0.0
    steps = 0
    for _epoch in range(config.epochs_per_iteration):
        for step_items in _chunks(chosen, per_step):
            step_tokens = sum(len(groups[i].rollouts[j].completion_ids) for i, j in step_items)
            step_loss = 0.0
            for micro in _chunks(step_items, config.micro_batch_size):
                prompts = [groups[i].prompt_ids for i, _ in micro]
                completions = [groups[i].rollouts[j].completion_ids for i, j in micro]
                logp, mask = learner.logps(learner.model, prompts, completions, 1.0, grad=True)
                loss = sft_loss(logp, mask, num_tokens=float(step_tokens))
                loss.backward()
                step_loss += float(loss.detach())
            norm_sum += learner.step()
            loss_sum += step_loss
            steps += 1
    stats.update({"train/loss": loss_sum / steps, "train/grad_norm": norm_sum / steps,
                  "train/steps": float(steps)})
    return stats


# ----------------------------------------------------------------------------- online DPO


def build_pairs(rewards: Sequence[float], how: Literal["best-worst", "all"],
                min_gap: float) -> list[tuple[int, int]]:
    """(chosen, rejected) sample indices of one prompt whose reward gap exceeds min_gap."""
    if how == "best-worst":
        best = max(range(len(rewards)), key=lambda j: (rewards[j], -j))
        worst = min(range(len(rewards)), key=lambda j: (rewards[j], j))
        return [(best, worst)] if rewards[best] - rewards[worst] > min_gap else []
    return [(a, b) for a in range(len(rewards)) for b in range(len(rewards))
            if rewards[a] - rewards[b] > min_gap]


def dpo_update(learner: Learner, groups: list[Group], config: OnlineConfig,
               sample_log: dict[tuple[int, int], dict[str, Any]]) -> dict[str, float]:
    """DPO (training.losses.preference_loss) on pairs built from the iteration's samples."""
    import torch

    from training.losses import preference_loss

    pairs = [(i, a, b) for i, g in enumerate(groups)
             for a, b in build_pairs(g.rewards, config.pairs, config.min_reward_gap)]
    stats = {"train/pairs": float(len(pairs)), "train/loss": 0.0, "train/grad_norm": 0.0,
             "train/accuracy": 0.0, "train/margin": 0.0, "train/steps": 0.0}
    if not pairs:
        return stats

    def tensors_of(items: Sequence[tuple[int, int, int]]) -> tuple[list[list[int]],
                                                                   list[list[int]]]:
        prompts = [groups[i].prompt_ids for i, _, _ in items]
        completions = [ids for i, a, b in items for ids in
                       (groups[i].rollouts[a].completion_ids, groups[i].rollouts[b].completion_ids)]
        return prompts, completions

    # Reference log-probs, once per iteration: the initial model, or the policy as it is now
    # (the iteration's starting point, before any update of this iteration).
    ref_sums: list[torch.Tensor] = []
    for micro in _chunks(pairs, max(1, config.micro_batch_size // 2)):
        prompts, completions = tensors_of(micro)
        if config.reference == "initial":
            with learner.initial_policy() as reference:
                ref, _ = learner.logps(reference, prompts, completions, 1.0, grad=False)
        else:
            ref, _ = learner.logps(learner.model, prompts, completions, 1.0, grad=False)
        ref_sums.append(ref.sum(-1))
    ref_all = torch.cat(ref_sums).view(-1, 2)  # (pairs, [chosen, rejected])
    for k, (i, a, b) in enumerate(pairs):
        sample_log[(i, a)].setdefault("ref_logp", float(ref_all[k, 0]))
        sample_log[(i, b)].setdefault("ref_logp", float(ref_all[k, 1]))

    per_step = len(pairs) if config.train_batch_size == 0 else config.train_batch_size
    order = list(range(len(pairs)))
    totals = {"loss": 0.0, "norm": 0.0, "accuracy": 0.0, "margin": 0.0}
    steps = 0
    for _epoch in range(config.epochs_per_iteration):
        for step_items in _chunks(order, per_step):
            for micro in _chunks(step_items, max(1, config.micro_batch_size // 2)):
                items = [pairs[k] for k in micro]
                prompts, completions = tensors_of(items)
                logp, mask = learner.logps(learner.model, prompts, completions, 1.0, grad=True)
                sums, lengths = logp.sum(-1).view(-1, 2), mask.sum(-1).view(-1, 2)
                ref = ref_all[list(micro)]
                losses = preference_loss(
                    config.loss_type,  # type: ignore[arg-type]
                    chosen_logps=sums[:, 0], rejected_logps=sums[:, 1],
                    ref_chosen_logps=ref[:, 0], ref_rejected_logps=ref[:, 1],
                    chosen_lengths=lengths[:, 0], rejected_lengths=lengths[:, 1],
                    beta=config.beta)
                loss = losses.sum() / len(step_items)
                loss.backward()
                margin = config.beta * ((sums[:, 0] - ref[:, 0]) - (sums[:, 1] - ref[:, 1]))
                totals["loss"] += float(loss.detach())
                totals["accuracy"] += float((margin > 0).float().sum()) / len(step_items)
                totals["margin"] += float(margin.detach().sum()) / len(step_items)
            totals["norm"] += learner.step()
            steps += 1
    stats.update({"train/loss": totals["loss"] / steps, "train/grad_norm": totals["norm"] / steps,
                  "train/accuracy": totals["accuracy"] / steps,
                  "train/margin": totals["margin"] / steps, "train/steps": float(steps)})
    return stats


# ----------------------------------------------------------------------------- the driver


def _rollout_dtype(config: OnlineConfig, learner: Learner) -> str:
    if config.rollout_dtype != "auto":
        return config.rollout_dtype
    from training.trainer import bf16_supported

    return "bfloat16" if bf16_supported(learner.device) else "float32"


def _start_engine(config: OnlineConfig, dtype: str, ray_address: str | None
                  ) -> tuple[RolloutEngine, Callable[[], None]]:
    """The rollout engine (a Ray actor unless rollout_actor is false) and how to stop it."""
    engine_kwargs: dict[str, Any] = {"dtype": dtype}
    if config.rollout_engine == "hf":
        engine_kwargs["batch_size"] = config.rollout_batch_size
    if not config.rollout_actor:
        from training.rollout import make_engine

        return make_engine(config.rollout_engine, config.model, **engine_kwargs), lambda: None
    import ray

    from training.raycluster import ensure_ray, shutdown_ray
    from training.rollout import RayRolloutEngine

    started_ray = not ray.is_initialized()
    ensure_ray(ray_address)
    threads = config.rollout_threads or os.cpu_count() or 1
    engine = RayRolloutEngine(config.rollout_engine, config.model, num_cpus=1,
                              num_threads=threads, **engine_kwargs)

    def stop() -> None:
        engine.shutdown()
        if started_ray:
            shutdown_ray()

    return engine, stop


def evaluate(engine: RolloutEngine, rows: list[PromptRow], reward_fn: RewardFn,
             config: OnlineConfig) -> tuple[float, list[dict[str, Any]]]:
    """Mean reward on held-out prompts (greedy, or sampled with a fixed seed), and the scored
    generations."""
    sampled = config.eval_temperature > 0
    params = SamplingParams(max_new_tokens=config.max_new_tokens,
                            temperature=config.eval_temperature,
                            n=config.eval_samples if sampled else 1, stop=config.stop,
                            include_stop=config.include_stop, seed=config.seed + 7_919)
    outputs = engine.generate([r.prompt for r in rows], params)
    flat = [(r, sample) for r, samples in zip(rows, outputs, strict=True) for sample in samples]
    texts = [sample.text for _, sample in flat]
    rewards = reward_fn([r.prompt for r, _ in flat], texts, [r.answer for r, _ in flat])
    records = [{"id": r.id, "sample_index": sample.sample_index, "text": t, "reward": w,
                "answer": r.answer}
               for (r, sample), t, w in zip(flat, texts, rewards, strict=True)]
    return sum(rewards) / len(rewards), records


def _append_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with path.open("a") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def train_online(config: OnlineConfig, *, ray_address: str | None = None,
                 reward_fn: RewardFn | None = None,
                 on_iteration: IterationCallback | None = None) -> OnlineResult:
    """Run `config.algo` for `config.iterations` iterations; see the module docstring.

    Args:
        config: a validated OnlineConfig.
        ray_address: a Ray cluster to join (None: a local Ray in this process).
        reward_fn: overrides config.reward (tests, custom Python rewards).
        on_iteration: callback(iteration, metrics) after each iteration.

    Raises:
        OnlineDataError, ConfigError, RewardSpecError: bad input, before any model is loaded.
    """
    import torch
    from tqdm.auto import tqdm

    # 1. Everything that can be wrong with the input is checked before a model is loaded.
    rows = read_prompts(config.prompts)
    eval_rows = read_prompts(config.eval_prompts) if config.eval_prompts else []
    reward = reward_fn or make_reward(config.reward)
    run_dir = Path(config.out)
    if (run_dir / "config.json").exists() or (run_dir / "model").exists():
        raise ConfigError(f"{run_dir} already holds a run; choose another out folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir / "config.json")
    for name in ("metrics.jsonl", "samples.jsonl", "eval.jsonl"):
        (run_dir / name).write_text("")

    needs_reference = (config.algo == "grpo" and config.kl_coef > 0) or (
        config.algo == "online-dpo" and config.reference == "initial")
    learner = Learner(config, needs_reference, prompts=[row.prompt for row in rows])
    dtype = _rollout_dtype(config, learner)
    sync_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(dtype)
    engine, stop_engine = _start_engine(config, dtype, ray_address)
    update = {"grpo": grpo_update, "rs": rs_update, "online-dpo": dpo_update}[config.algo]
    run_info: dict[str, Any] = {
        "algo": config.algo, "prompts": config.prompts, "num_prompts": len(rows),
        "torch": torch.__version__, "python": platform.python_version(),
        "device": learner.device.type, "bf16": learner.bf16, "lora": learner.lora,
        "attention": learner.attention,
        "rollout_dtype": dtype, "rollout_actor": config.rollout_actor,
    }
    (run_dir / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
    summary: dict[str, float] = {}
    last: dict[str, float] = {}
    started = time.perf_counter()
    try:
        if eval_rows:
            summary["eval/reward_before"], records = evaluate(engine, eval_rows, reward, config)
            _append_jsonl(run_dir / "eval.jsonl", [{"iteration": 0, **r} for r in records])
        order = prompt_order(len(rows), config.seed)
        bar = tqdm(range(1, config.iterations + 1), desc=config.algo, unit="iter",
                   disable=not config.progress)
        for iteration in bar:
            # 2. Rollouts from the current policy.
            t0 = time.perf_counter()
            picked = [next(order) for _ in range(config.prompts_per_iteration)]
            params = SamplingParams(
                max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                top_p=config.top_p, n=config.samples_per_prompt, stop=config.stop,
                include_stop=config.include_stop, seed=config.seed * 1_000_003 + iteration)
            outputs = engine.generate([rows[i].prompt for i in picked], params)
            t1 = time.perf_counter()
            # 3. Rewards.
            flat = [(k, r) for k, samples in enumerate(outputs) for r in samples]
            scores = reward([rows[picked[k]].prompt for k, _ in flat], [r.text for _, r in flat],
                            [rows[picked[k]].answer for k, _ in flat])
            groups = [Group(rows[i], i, outputs[k], []) for k, i in enumerate(picked)]
            for (k, _), score in zip(flat, scores, strict=True):
                groups[k].rewards.append(float(score))
            sample_log = {
                (k, r.sample_index): {
                    "iteration": iteration, "prompt_index": picked[k], "id": rows[picked[k]].id,
                    "sample_index": r.sample_index, "text": r.text,
                    "answer": rows[picked[k]].answer,
                    "reward": float(score), "completion_ids": r.completion_ids,
                    "completion_tokens": len(r.completion_ids),
                    "finish_reason": r.finish_reason, "rollout_logp": float(sum(r.logprobs))}
                for (k, r), score in zip(flat, scores, strict=True)}
            t2 = time.perf_counter()
            # 4. Learn, then 5. push the new weights to the rollout engine.
            stats = update(learner, groups, config, sample_log)
            t3 = time.perf_counter()
            if stats.get("train/steps", 0.0) > 0:
                engine.load_state_dict(learner.weights_for_sync(sync_dtype))
            t4 = time.perf_counter()
            _append_jsonl(run_dir / "samples.jsonl", list(sample_log.values()))
            reward_values = torch.tensor(scores, dtype=torch.float64)
            metrics: dict[str, float] = {
                "iteration": float(iteration), "step": float(learner.steps),
                "rollout/reward_mean": float(reward_values.mean()),
                "rollout/reward_std": float(reward_values.std()) if len(scores) > 1 else 0.0,
                "rollout/completion_tokens": sum(len(r.completion_ids) for _, r in flat)
                / len(flat),
                "rollout/stopped_rate": sum(r.finish_reason == "stop" for _, r in flat)
                / len(flat),
                **stats,
                "time/rollout_s": t1 - t0, "time/reward_s": t2 - t1, "time/learn_s": t3 - t2,
                "time/sync_s": t4 - t3,
                "rollout/tokens_per_s": sum(len(r.completion_ids) for _, r in flat)
                / max(t1 - t0, 1e-9),
            }
            if eval_rows and config.eval_every and iteration % config.eval_every == 0 \
                    and iteration != config.iterations:
                metrics["eval/reward"], records = evaluate(engine, eval_rows, reward, config)
                _append_jsonl(run_dir / "eval.jsonl",
                              [{"iteration": iteration, **r} for r in records])
            _append_jsonl(run_dir / "metrics.jsonl", [metrics])
            last = metrics
            bar.set_postfix(reward=f"{metrics['rollout/reward_mean']:.3f}",
                            steps=learner.steps, learn_s=f"{t3 - t2:.0f}")
            if on_iteration is not None:
                on_iteration(iteration, metrics)
        bar.close()
        if eval_rows:
            summary["eval/reward_after"], records = evaluate(engine, eval_rows, reward, config)
            _append_jsonl(run_dir / "eval.jsonl",
                          [{"iteration": config.iterations, **r} for r in records])
    finally:
        stop_engine()
    model_dir = learner.save_full_model(run_dir)
    summary.update(last)
    summary["time/total_s"] = time.perf_counter() - started
    run_info.update({"steps_done": learner.steps, "final_metrics": summary})
    (run_dir / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
    return OnlineResult(run_dir, model_dir, learner.steps, summary)


def run_online(algo: Algo, *, prompts: str, model: str, out: str,
               config_path: str | None = None, overrides: Sequence[str] = (),
               ray_address: str | None = None, reward_fn: RewardFn | None = None,
               on_iteration: IterationCallback | None = None) -> OnlineResult:
    """What `prefloop train grpo|rs|online-dpo` and the training rounds call.

    Resolves the config (bundled defaults -> config_path -> overrides -> prompts/model/out) and
    runs it; see train_online for the other arguments.
    """
    items = [*overrides, f"prompts={prompts}", f"model={model}", f"out={out}"]
    config = load_online_config(algo, config_path, items)
    return train_online(config, ray_address=ray_address, reward_fn=reward_fn,
                        on_iteration=on_iteration)


__all__ = ["Learner", "OnlineDataError", "OnlineResult", "best_of_n", "build_pairs",
           "grouped_completion_logps", "read_prompts", "run_online", "train_online"]
