"""The four PPO roles - actor, reference, critic, reward - and how Ray places them.

OpenRLHF's layout (Hu et al. 2024, arXiv:2405.11143, Sec. 3): one Ray actor per role, with
`--colocate actor,ref` hosting the reference inside the actor's process and `--colocate
critic,reward` the reward model inside the critic's. Each role is a plain Python class (usable
and testable without Ray); `RoleHost` is the Ray actor that hosts one or more of them; `RoleGroup`
creates the hosts in one placement group (one bundle per host, fractional CPUs so that four roles
fit on a 2-CPU local Ray) and routes calls. The actor can run as N data-parallel workers whose
gradients are all-reduced with torch.distributed (gloo on CPU).

    python -c "from training.ray_roles import hosts_for; print(hosts_for(1, True, False))"

Batch layout shared by every role (what `collate_rollouts` builds): prompts left-padded to width
P, completions right-padded to width C, so per-token tensors are (B, C) with the completion mask
1 on generated tokens (the layout of training.rl_losses). Position ids come from the attention
mask, so left padding does not shift positions.

Step ids make the stateful updates idempotent: `train(step)` applies step k only after k-1, and a
repeated delivery of step k returns the recorded result without a second optimizer step.
"""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.ppo_config import PPOConfig

if TYPE_CHECKING:
    import torch


class RoleError(RuntimeError):
    """A role refused a call (e.g. an update out of order)."""


class StepOrderError(RoleError):
    """An update for step k arrived when the role had applied a step other than k-1 or k."""


# ------------------------------------------------------------------------------ batch layout


@dataclass
class RolloutShard:
    """One actor worker's share of a PPO batch: what every other role needs to score it."""

    prompts: list[Any]  # the original prompt (str or messages), one per sequence
    answers: list[str | None]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    finish_reasons: list[str]
    prompt_index: list[int]  # index into the prompt file
    old_logp: torch.Tensor | None = None  # (B, C) actor log-probs at sampling time

    def __len__(self) -> int:
        return len(self.completion_ids)


@dataclass
class SequenceBatch:
    """Left-padded prompts + right-padded completions, as tensors."""

    input_ids: torch.Tensor  # (B, P + C)
    attention_mask: torch.Tensor  # (B, P + C)
    position_ids: torch.Tensor  # (B, P + C)
    completion_mask: torch.Tensor  # (B, C) float, 1 on generated tokens
    prompt_width: int  # P

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_width:]

    def to(self, device: Any) -> SequenceBatch:
        return SequenceBatch(self.input_ids.to(device), self.attention_mask.to(device),
                             self.position_ids.to(device), self.completion_mask.to(device),
                             self.prompt_width)

    def rows(self, index: torch.Tensor) -> SequenceBatch:
        """The rows `index` (a mini-batch), same widths."""
        return SequenceBatch(self.input_ids[index], self.attention_mask[index],
                             self.position_ids[index], self.completion_mask[index],
                             self.prompt_width)


def collate_rollouts(prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]],
                     pad_id: int) -> SequenceBatch:
    """Left-pad prompts to the longest prompt, right-pad completions to the longest completion."""
    import torch

    width_p = max(len(p) for p in prompt_ids)
    width_c = max(max(len(c) for c in completion_ids), 1)
    rows = len(prompt_ids)
    input_ids = torch.full((rows, width_p + width_c), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, width_p + width_c), dtype=torch.long)
    completion_mask = torch.zeros((rows, width_c), dtype=torch.float32)
    for row, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        input_ids[row, width_p - len(prompt):width_p] = torch.tensor(prompt, dtype=torch.long)
        attention[row, width_p - len(prompt):width_p] = 1
        if completion:
            input_ids[row, width_p:width_p + len(completion)] = torch.tensor(completion)
            attention[row, width_p:width_p + len(completion)] = 1
            completion_mask[row, :len(completion)] = 1
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    return SequenceBatch(input_ids, attention, positions, completion_mask, width_p)


def pad_right(tensors: Sequence[torch.Tensor], value: float = 0.0) -> torch.Tensor:
    """Concatenate (B_i, C_i) tensors along dim 0, right-padding dim 1 to the largest C_i."""
    import torch

    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)
                      for t in tensors])


def policy_logps(model: Any, batch: SequenceBatch, temperature: float) -> torch.Tensor:
    """log pi(y_t | x, y_<t) of each completion token, from temperature-scaled logits.

    The sampler drew from softmax(logits / T), so the PPO ratio must use the same distribution.

    Returns:
        (B, C) log-probs, 0 off the completion mask.
    """
    from training.losses import token_logps

    width_c = batch.completion_mask.shape[1]
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, logits_to_keep=width_c + 1, use_cache=False)
    logits = out.logits[:, :-1].float() / temperature  # (B, C, V): position P-1+t predicts y_t
    return token_logps(logits, batch.completion_ids) * batch.completion_mask


def _backbone_and_head(model: Any) -> tuple[Any, Any]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix), base.score


def _hidden_states(model: Any, batch: SequenceBatch) -> tuple[torch.Tensor, Any]:
    backbone, head = _backbone_and_head(model)
    hidden = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      position_ids=batch.position_ids, use_cache=False)[0]
    return hidden, head


def token_values(model: Any, batch: SequenceBatch) -> torch.Tensor:
    """Critic values V(s_t) of the state before each completion token: the scalar head on the
    hidden state that predicts y_t (positions P-1 .. P+C-2). Returns (B, C), 0 off the mask."""
    hidden, head = _hidden_states(model, batch)
    start, width_c = batch.prompt_width - 1, batch.completion_mask.shape[1]
    values = head(hidden[:, start:start + width_c]).squeeze(-1).float()
    return values * batch.completion_mask


def last_token_scores(model: Any, batch: SequenceBatch) -> torch.Tensor:
    """The scalar head on each row's last real token (the reward model's score). Returns (B,)."""
    import torch

    hidden, head = _hidden_states(model, batch)
    last = batch.prompt_width + batch.completion_mask.sum(-1).long() - 1
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return head(hidden[rows, last]).squeeze(-1).float()


# ------------------------------------------------------------------------------ models


def _device(cfg: PPOConfig) -> Any:
    import torch

    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _uses_lora(cfg: PPOConfig, device: Any) -> bool:
    return cfg.lora == "on" or (cfg.lora == "auto" and device.type == "cpu")


def _with_lora(model: Any, cfg: PPOConfig, task_type: str) -> Any:
    from peft import LoraConfig, get_peft_model

    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in cfg.lora_target_modules if t not in leaves]
    if missing:
        raise RoleError(f"LoRA target module(s) {missing} not found in the model")
    return get_peft_model(model, LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules), task_type=task_type))


def resolve_model_folder(path: str) -> str:
    """A model name or folder; a `prefloop train rm` run folder means its model/ subfolder."""
    from training.models import resolve_model

    folder = Path(path).expanduser()
    if (folder / "model").is_dir() and not (folder / "config.json").exists():
        path = str(folder / "model")
    return resolve_model(path)


def load_scalar_model(path: str, pad_token_id: int) -> Any:
    """A one-output sequence-classification model (reward model or critic) from `path`.

    A LoRA reward model saved by `prefloop train rm` on CPU is an adapter folder: it is merged
    onto its base here. A plain causal LM gets a new, seeded value head
    (training.models.load_reward_backbone).
    """
    import torch

    from training.models import load_reward_backbone

    resolved = resolve_model_folder(path)
    if (Path(resolved) / "adapter_config.json").exists():
        from peft import AutoPeftModelForSequenceClassification

        model = AutoPeftModelForSequenceClassification.from_pretrained(
            resolved, num_labels=1, dtype=torch.float32).merge_and_unload()
        model.config.pad_token_id = pad_token_id
        return model
    return load_reward_backbone(resolved, pad_token_id, dtype=torch.float32)


def _trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str,
              min_lr_ratio: float) -> float:
    """Linear warmup from lr/(warmup+1) to lr, then constant or cosine down to min_lr_ratio*lr
    (Loshchilov & Hutter 2017, SGDR Eq. 5 without restarts; OpenRLHF's cosine_with_min_lr)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _optimizer(params: list[Any], lr: float, cfg: PPOConfig, total_steps: int) -> tuple[Any, Any]:
    import torch

    optimizer = torch.optim.AdamW(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, warmup_steps=cfg.warmup_steps, total_steps=total_steps, schedule=cfg.lr_schedule,
        min_lr_ratio=cfg.min_lr_ratio))
    return optimizer, scheduler


def minibatch_order(rows: int, *, seed: int, step: int, epoch: int) -> list[int]:
    """The order in which a worker visits its rows in one PPO epoch: a pure function of
    (seed, step, epoch), so a replayed step takes exactly the same mini-batches."""
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + epoch)
    return torch.randperm(rows, generator=generator).tolist()


@dataclass
class StepLedger:
    """Which update a stateful role applied last, and what it returned (idempotent step ids)."""

    applied_step: int = 0
    optimizer_steps: int = 0
    results: dict[int, dict[str, float]] = field(default_factory=dict)

    def check(self, step: int) -> dict[str, float] | None:
        """The recorded result if `step` was already applied; None if it is next; else raise."""
        if step == self.applied_step and step in self.results:
            return self.results[step]
        if step != self.applied_step + 1:
            raise StepOrderError(f"update for step {step} arrived after step {self.applied_step}"
                                 " was applied: refusing to skip or repeat an update")
        return None

    def record(self, step: int, result: dict[str, float]) -> dict[str, float]:
        self.applied_step = step
        self.results = {step: result}
        return result


# ------------------------------------------------------------------------------ the roles


class _TrainedRole:
    """What the actor and the critic share: trainable weights with an AdamW optimizer, an LR
    schedule and a step ledger, which step together and are checkpointed together."""

    role_name: str  # "actor" or "critic", as checkpoint errors name it
    cfg: PPOConfig
    model: Any
    trainable: list[Any]
    optimizer: Any
    scheduler: Any
    ledger: StepLedger

    def _optimizer_step(self) -> float:
        """Clip the gradients, step the optimizer and the LR schedule; returns the grad norm."""
        import torch

        limit = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, limit))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ledger.optimizer_steps += 1
        return grad_norm

    def state(self) -> dict[str, Any]:
        return {"trainable": _trainable_state(self.model),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "applied_step": self.ledger.applied_step,
                "optimizer_steps": self.ledger.optimizer_steps}

    def load_state(self, state: dict[str, Any]) -> None:
        missing = self.model.load_state_dict(state["trainable"], strict=False)
        if missing.unexpected_keys:
            raise RoleError(f"checkpoint has unknown {self.role_name} weights "
                            f"{missing.unexpected_keys[:3]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.ledger = StepLedger(int(state["applied_step"]), int(state["optimizer_steps"]))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return _trainable_state(self.model)

    def optimizer_steps(self) -> int:
        return self.ledger.optimizer_steps


class ActorRole(_TrainedRole):
    """The policy: generates rollouts (through a rollout engine synced with its weights),
    computes advantages for its shard, and takes clipped-PPO (+ptx) optimizer steps."""

    role_name = "actor"

    def __init__(self, cfg: PPOConfig, rank: int = 0, world_size: int = 1):
        import torch

        from training.models import load_policy, load_tokenizer, resolve_model
        from training.rollout import make_engine

        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = _device(cfg)
        self.tokenizer = load_tokenizer(cfg.model)
        self.pad_id = int(self.tokenizer.pad_token_id)
        torch.manual_seed(cfg.seed)
        model = load_policy(cfg.model, dtype=torch.float32)
        self.lora = _uses_lora(cfg, self.device)
        if self.lora:
            model = _with_lora(model, cfg, "CAUSAL_LM")
        self.model = model.to(self.device)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        actor_steps = (cfg.steps - cfg.freeze_actor_steps) * cfg.updates_per_step
        self.optimizer, self.scheduler = _optimizer(self.trainable, cfg.actor_lr, cfg,
                                                    actor_steps)
        self.engine = make_engine(cfg.rollout_engine, resolve_model(cfg.model),
                                  batch_size=cfg.generation_batch_size, device=self.device.type)
        self.engine_in_sync = True  # the engine loaded the same initial weights
        self.ledger = StepLedger()
        self.experience: dict[str, Any] = {}
        self.ptx = self._load_ptx() if cfg.ptx_data else None
        self.group: Any = None

    # --- distributed -------------------------------------------------------------------
    def init_process_group(self, address: str, port: int) -> None:
        """Join the gloo group of the actor workers (all-reduced gradients)."""
        import torch.distributed as dist

        if self.world_size == 1:
            return
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group("gloo", init_method=f"tcp://{address}:{port}",
                                rank=self.rank, world_size=self.world_size)
        self.group = dist.group.WORLD

    def _all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    # --- rollouts -----------------------------------------------------------------------
    def rollout(self, step: int, prompts: list[Any], answers: list[str | None],
                prompt_index: list[int], seed: int) -> RolloutShard:
        """Sample `samples_per_prompt` completions per prompt and their log-probs."""
        import torch

        from training.rollout import SamplingParams, policy_weights_for_sync

        if not self.engine_in_sync:
            self.engine.load_state_dict(policy_weights_for_sync(self.model))
            self.engine_in_sync = True
        params = SamplingParams(max_new_tokens=self.cfg.max_new_tokens,
                                temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                                n=self.cfg.samples_per_prompt, seed=seed)
        torch.manual_seed(seed)  # engines that draw from the global generator are seeded too
        groups = self.engine.generate(prompts, params)
        shard = RolloutShard([], [], [], [], [], [], [])
        eos = self.tokenizer.eos_token_id
        for local, samples in enumerate(groups):
            for sample in samples:
                shard.prompts.append(prompts[local])
                shard.answers.append(answers[local])
                shard.prompt_ids.append(list(sample.prompt_ids))
                # An empty completion still has to carry the reward: give it the EOS token.
                shard.completion_ids.append(list(sample.completion_ids) or [eos])
                shard.texts.append(sample.text)
                shard.finish_reasons.append(sample.finish_reason)
                shard.prompt_index.append(prompt_index[local])
        batch = collate_rollouts(shard.prompt_ids, shard.completion_ids, self.pad_id)
        self.model.eval()
        with torch.no_grad():
            shard.old_logp = policy_logps(self.model, batch.to(self.device),
                                          self.cfg.temperature).cpu()
        self.experience = {"step": step, "batch": batch, "old_logp": shard.old_logp}
        return shard

    # --- advantages ---------------------------------------------------------------------
    def make_advantages(self, step: int, ref_logp: torch.Tensor, values: torch.Tensor,
                        scores: torch.Tensor, kl_coef: float) -> tuple[float, float, float]:
        """Token rewards and (unwhitened) advantages of this shard; returns their moments
        (count, sum, sumsq) for global whitening."""
        from training.ppo import shard_advantages
        from training.rl_losses import shard_moments

        self._check_experience(step)
        exp = self.experience
        mask = exp["batch"].completion_mask
        out = shard_advantages(self.cfg, old_logp=exp["old_logp"], ref_logp=ref_logp,
                               values=values, scores=scores, mask=mask, kl_coef=kl_coef)
        exp.update(out, ref_logp=ref_logp, values=values, scores=scores)
        return shard_moments(out["advantages"], mask)

    def whiten(self, step: int, stats: tuple[float, float] | None) -> dict[str, torch.Tensor]:
        """Whiten this shard's advantages with the global (mean, var); returns what the critic
        and the log need."""
        from training.rl_losses import masked_whiten

        self._check_experience(step)
        exp = self.experience
        mask = exp["batch"].completion_mask
        raw = exp["advantages"]
        exp["train_advantages"] = (masked_whiten(raw, mask, stats=stats) if stats is not None
                                   else raw)
        return {"old_logp": exp["old_logp"], "ref_logp": exp["ref_logp"],
                "values": exp["values"], "kl": exp["kl"], "rewards": exp["rewards"],
                "raw_advantages": raw, "advantages": exp["train_advantages"],
                "returns": exp["returns"], "mask": mask}

    def _check_experience(self, step: int) -> None:
        if self.experience.get("step") != step:
            raise RoleError(f"actor worker {self.rank} holds no rollouts of step {step} "
                            f"(it has step {self.experience.get('step')}); was it restarted?")

    # --- the update ---------------------------------------------------------------------
    def _load_ptx(self) -> list[tuple[list[int], list[int]]]:
        from training.data import encode_prompt_completion

        rows = []
        for number, line in enumerate(Path(self.cfg.ptx_data).read_text().splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt" not in row or "completion" not in row:
                raise RoleError(f"{self.cfg.ptx_data}:{number}: needs 'prompt' and 'completion'")
            rows.append(encode_prompt_completion(self.tokenizer, row["prompt"],
                                                 row["completion"]))
        if not rows:
            raise RoleError(f"{self.cfg.ptx_data} holds no rows")
        return rows

    def _ptx_loss(self, step: int, update: int) -> torch.Tensor:
        """Mean NLL of a seeded SFT mini-batch (InstructGPT's pretraining-mix term, Eq. 2)."""
        import torch

        assert self.ptx is not None
        generator = torch.Generator().manual_seed(self.cfg.seed + 7919 * step + update)
        picks = torch.randint(len(self.ptx), (self.cfg.ptx_batch_size,), generator=generator)
        mine = picks.tolist()[self.rank::self.world_size] or picks.tolist()[:1]
        rows = [self.ptx[i] for i in mine]
        batch = collate_rollouts([r[0] for r in rows], [r[1] for r in rows], self.pad_id)
        logps = policy_logps(self.model, batch.to(self.device), 1.0)
        mask = batch.completion_mask.to(self.device)
        return -(logps * mask).sum() / mask.sum().clamp(min=1)

    def train(self, step: int, frozen: bool) -> dict[str, float]:
        """One PPO update of the actor on this worker's shard (all workers in lockstep)."""
        import torch

        from training.ppo import ptx_combined_loss
        from training.rl_losses import clipped_policy_loss

        done = self.ledger.check(step)
        if done is not None:
            return done
        if frozen:  # critic warm-up: no actor step at all, not even the LR schedule
            return self.ledger.record(step, {"actor/frozen": 1.0})
        self._check_experience(step)
        exp, cfg = self.experience, self.cfg
        batch: SequenceBatch = exp["batch"]
        rows = batch.input_ids.shape[0]
        per_update = cfg.mini_batch_size // self.world_size
        eps = cfg.policy_clip_eps if cfg.policy_clip_eps > 0 else float("inf")
        totals = {"actor/policy_loss": 0.0, "actor/clip_fraction": 0.0, "actor/ptx_loss": 0.0,
                  "actor/approx_kl": 0.0, "actor/grad_norm": 0.0}
        updates = 0
        self.model.train()
        for epoch in range(cfg.ppo_epochs):
            order = minibatch_order(rows, seed=cfg.seed + self.rank, step=step, epoch=epoch)
            for start in range(0, rows, per_update):
                idx = torch.tensor(order[start:start + per_update])
                mb = batch.rows(idx).to(self.device)
                mask = mb.completion_mask
                old = exp["old_logp"][idx].to(self.device)
                adv = exp["train_advantages"][idx].to(self.device)
                logp = policy_logps(self.model, mb, cfg.temperature)
                pg_loss, clip_fraction = clipped_policy_loss(logp, old, adv, mask, eps)
                # Each worker's loss is a mean over its own tokens; weighting by its share of the
                # global token count makes the all-reduced SUM the global token mean.
                tokens = self._all_reduce_sum(mask.sum().detach().clone())
                share = mask.sum() / tokens.clamp(min=1)
                loss = pg_loss * share
                ptx_value = 0.0
                if self.ptx is not None:
                    ptx = self._ptx_loss(step, updates)
                    loss = ptx_combined_loss(pg_loss, ptx, cfg.ptx_coef, cfg.ptx_scale) * share
                    ptx_value = float(ptx.detach())
                loss.backward()
                for p in self.trainable:
                    if p.grad is not None:
                        self._all_reduce_sum(p.grad)
                grad_norm = self._optimizer_step()
                updates += 1
                with torch.no_grad():
                    approx_kl = float(((old - logp) * mask).sum() / mask.sum().clamp(min=1))
                totals["actor/policy_loss"] += float(pg_loss.detach())
                totals["actor/clip_fraction"] += float(clip_fraction)
                totals["actor/ptx_loss"] += ptx_value
                totals["actor/approx_kl"] += approx_kl
                totals["actor/grad_norm"] += grad_norm
        self.engine_in_sync = False
        result = {k: v / max(updates, 1) for k, v in totals.items()}
        result |= {"actor/frozen": 0.0, "actor/lr": self.scheduler.get_last_lr()[0],
                   "actor/optimizer_steps": float(self.ledger.optimizer_steps)}
        return self.ledger.record(step, result)

    # --- state --------------------------------------------------------------------------
    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        # The rollout engine still holds the weights from before the restore, and so do the
        # rollouts taken before it: resync on the next rollout, keep no stale experience.
        self.engine_in_sync = False
        self.experience = {}

    def save_checkpoint_model(self, folder: str) -> None:
        """Checkpoint copy: the LoRA adapter (small) or the full model, with the tokenizer."""
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    def save_full_model(self, folder: str) -> None:
        """A FULL Hugging Face folder (LoRA merged into a freshly loaded model, which generates
        at full speed, PLATFORM.md section 13)."""
        import torch

        from training.models import load_policy
        from training.rollout import policy_weights_for_sync

        fresh = load_policy(self.cfg.model, dtype=torch.float32)
        # With LoRA only the wrapped layers change (merged here); the rest is the base model.
        result = fresh.load_state_dict(policy_weights_for_sync(self.model), strict=False)
        if result.unexpected_keys:
            raise RoleError(f"merged weights unknown to the model: {result.unexpected_keys[:3]}")
        fresh.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)


class ReferenceRole:
    """The frozen initial policy: log-probs of the sampled tokens for the KL penalty."""

    def __init__(self, cfg: PPOConfig):
        import torch

        from training.models import load_policy, load_tokenizer

        self.cfg, self.device = cfg, _device(cfg)
        self.pad_id = int(load_tokenizer(cfg.model).pad_token_id)
        self.model = load_policy(cfg.model, dtype=torch.float32).to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def logps(self, shard: RolloutShard) -> torch.Tensor:
        import torch

        batch = collate_rollouts(shard.prompt_ids, shard.completion_ids, self.pad_id)
        with torch.no_grad():
            return policy_logps(self.model, batch.to(self.device), self.cfg.temperature).cpu()

    def parameters_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}


class CriticRole(_TrainedRole):
    """The value model V(s_t): a scalar head on a transformer, initialised from the reward model
    by default (OpenRLHF trick), trained with the clipped value loss."""

    role_name = "critic"

    def __init__(self, cfg: PPOConfig):
        import torch

        from training.models import load_tokenizer

        self.cfg, self.device = cfg, _device(cfg)
        self.pad_id = int(load_tokenizer(cfg.model).pad_token_id)
        torch.manual_seed(cfg.seed + 1)  # a fresh value head (critic from a causal LM) is seeded
        model = load_scalar_model(cfg.critic_source, self.pad_id)
        if _uses_lora(cfg, self.device):
            model = _with_lora(model, cfg, "SEQ_CLS")  # SEQ_CLS keeps the head fully trainable
        self.model = model.to(self.device)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = _optimizer(self.trainable, cfg.critic_lr, cfg,
                                                    cfg.steps * cfg.updates_per_step)
        self.ledger = StepLedger()

    def values(self, shard: RolloutShard) -> torch.Tensor:
        import torch

        batch = collate_rollouts(shard.prompt_ids, shard.completion_ids, self.pad_id)
        self.model.eval()
        with torch.no_grad():
            return token_values(self.model, batch.to(self.device)).cpu()

    def train(self, step: int, shards: list[RolloutShard],
              experience: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One PPO update of the critic on the whole batch (all actor shards)."""
        import torch

        from training.rl_losses import clipped_value_loss, masked_mean

        done = self.ledger.check(step)
        if done is not None:
            return done
        cfg = self.cfg
        prompt_ids = [p for s in shards for p in s.prompt_ids]
        completion_ids = [c for s in shards for c in s.completion_ids]
        batch = collate_rollouts(prompt_ids, completion_ids, self.pad_id)
        old_values = pad_right([e["values"] for e in experience])
        returns = pad_right([e["returns"] for e in experience])
        rows = batch.input_ids.shape[0]
        totals = {"critic/value_loss": 0.0, "critic/grad_norm": 0.0, "critic/value_mean": 0.0}
        updates = 0
        self.model.train()
        for epoch in range(cfg.ppo_epochs):
            order = minibatch_order(rows, seed=cfg.seed + 104729, step=step, epoch=epoch)
            for start in range(0, rows, cfg.mini_batch_size):
                idx = torch.tensor(order[start:start + cfg.mini_batch_size])
                mb = batch.rows(idx).to(self.device)
                mask = mb.completion_mask
                values = token_values(self.model, mb)
                old = old_values[idx].to(self.device)
                target = returns[idx].to(self.device)
                if cfg.value_clip_eps > 0:
                    loss = clipped_value_loss(values, old, target, mask, cfg.value_clip_eps)
                else:
                    loss = 0.5 * masked_mean((values - target) ** 2, mask)
                loss.backward()
                grad_norm = self._optimizer_step()
                updates += 1
                totals["critic/value_loss"] += float(loss.detach())
                totals["critic/grad_norm"] += grad_norm
                totals["critic/value_mean"] += float(masked_mean(values.detach(), mask))
        result = {k: v / max(updates, 1) for k, v in totals.items()}
        result |= {"critic/lr": self.scheduler.get_last_lr()[0],
                   "critic/optimizer_steps": float(self.ledger.optimizer_steps)}
        return self.ledger.record(step, result)


class RewardRole:
    """Sequence scores. With a reward model whose tokenizer is the policy's, the model reads the
    generated token ids directly (no detokenise/retokenise round trip), at an end-of-text token
    when reward_on_eos; otherwise (rule rewards, compositions, another tokenizer) the texts go
    through training.rewards.make_reward."""

    def __init__(self, cfg: PPOConfig):
        from training.models import load_tokenizer

        self.cfg, self.device = cfg, _device(cfg)
        tokenizer = load_tokenizer(cfg.model)
        self.pad_id, self.eos_id = int(tokenizer.pad_token_id), tokenizer.eos_token_id
        self.model: Any = None
        self.reward_fn: Any = None
        self.turn_suffix = chat_turn_suffix(tokenizer)
        if cfg.reward_model and self._same_tokenizer(resolve_model_folder(cfg.reward_model),
                                                     tokenizer):
            self.model = load_scalar_model(cfg.reward_model, self.pad_id).to(self.device).eval()
        else:
            from training.rewards import make_reward

            self.reward_fn = make_reward(cfg.reward_spec)

    @staticmethod
    def _same_tokenizer(path: str, tokenizer: Any) -> bool:
        from training.models import load_tokenizer

        try:
            theirs = load_tokenizer(path)
        except (OSError, ValueError):
            return False
        return bool(theirs.get_vocab() == tokenizer.get_vocab()
                    and theirs.eos_token_id == tokenizer.eos_token_id)

    def score(self, shard: RolloutShard) -> torch.Tensor:
        import torch

        if self.model is None:
            return torch.tensor(self.reward_fn(shard.prompts, shard.texts, shard.answers),
                                dtype=torch.float32)
        completions = [list(c) for c in shard.completion_ids]
        if self.cfg.reward_on_eos:
            # The RM was trained on sequences ending in EOS (training.data appends it; a chat
            # turn is closed by the template): a generation cut at max_new_tokens gets one, and
            # chat rows get the template's closing tokens, so every score is read where the RM
            # learnt to read it.
            completions = [c if c and c[-1] == self.eos_id else [*c, self.eos_id]
                           for c in completions]
            completions = [[*c, *self.turn_suffix] if isinstance(prompt, list) else c
                           for c, prompt in zip(completions, shard.prompts, strict=True)]
        batch = collate_rollouts(shard.prompt_ids, completions, self.pad_id)
        with torch.no_grad():
            return last_token_scores(self.model, batch.to(self.device)).cpu()


def chat_turn_suffix(tokenizer: Any) -> list[int]:
    """Tokens the chat template puts after an assistant turn's EOS (SmolLM2: a newline), i.e.
    what ends a chat row in reward-model training (training.data.encode_prompt_completion)."""
    if not getattr(tokenizer, "chat_template", None) or tokenizer.eos_token_id is None:
        return []
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ends = [i for i, token in enumerate(ids) if token == tokenizer.eos_token_id]
    return ids[ends[-1] + 1:] if ends else []


# ------------------------------------------------------------------------------ Ray hosting

ROLE_CLASSES = {"actor": ActorRole, "ref": ReferenceRole, "critic": CriticRole,
                "reward": RewardRole}


def hosts_for(actor_workers: int, colocate_actor_ref: bool,
              colocate_critic_reward: bool) -> list[tuple[str, ...]]:
    """The roles of each Ray actor to create, in order (actor workers first).

    >>> hosts_for(1, False, False)
    [('actor',), ('ref',), ('critic',), ('reward',)]
    """
    hosts: list[tuple[str, ...]] = [("actor", "ref") if colocate_actor_ref else ("actor",)
                                    for _ in range(actor_workers)]
    if not colocate_actor_ref:
        hosts.append(("ref",))
    hosts += [("critic", "reward")] if colocate_critic_reward else [("critic",), ("reward",)]
    return hosts


class RoleHost:
    """What runs inside one Ray actor: one or more roles, sharing a process (and its CPUs)."""

    def __init__(self, roles: tuple[str, ...], cfg: PPOConfig, rank: int, world_size: int):
        if cfg.threads_per_worker:
            import torch

            torch.set_num_threads(cfg.threads_per_worker)
        self.names = roles
        self.roles: dict[str, Any] = {}
        for name in roles:
            self.roles[name] = (ActorRole(cfg, rank, world_size) if name == "actor"
                                else ROLE_CLASSES[name](cfg))

    def call(self, role: str, method: str, *args: Any, **kwargs: Any) -> Any:
        if role not in self.roles:
            raise RoleError(f"this worker hosts {self.names}, not {role!r}")
        return getattr(self.roles[role], method)(*args, **kwargs)

    def ping(self) -> dict[str, Any]:
        return {"roles": list(self.names), "pid": os.getpid()}

    def rendezvous(self) -> tuple[str, int]:
        """An address and free port for the actor workers' process group (asked of rank 0)."""
        import ray

        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), int(port)


class RoleGroup:
    """Driver side: creates the RoleHosts in a placement group and routes calls to roles."""

    def __init__(self, cfg: PPOConfig, *, ready_timeout_s: float = 600.0,
                 local: bool = True):
        self.cfg = cfg
        self.local = local  # a local Ray cannot grow: refuse an impossible layout at once
        self.layout = hosts_for(cfg.actor_workers, cfg.colocate_actor_ref,
                                cfg.colocate_critic_reward)
        self.ready_timeout_s = ready_timeout_s
        self.placement_group: Any = None
        self.handles: list[Any] = []

    # --- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        import ray
        from ray.util.placement_group import placement_group

        bundle: dict[str, float] = {"CPU": self.cfg.cpus_per_worker}
        if self.cfg.gpus_per_worker:
            bundle["GPU"] = self.cfg.gpus_per_worker
        if self.local:
            have = ray.cluster_resources()
            for resource, amount in bundle.items():
                if amount * len(self.layout) > have.get(resource, 0.0) + 1e-9:
                    raise RoleError(
                        f"{len(self.layout)} Ray actors x {amount} {resource} exceed the local "
                        f"Ray's {have.get(resource, 0.0):g} {resource}; lower cpus_per_worker/"
                        "gpus_per_worker or colocate roles (--colocate actor,ref)")
        self.placement_group = placement_group([dict(bundle) for _ in self.layout],
                                               strategy="PACK")
        ready, _ = ray.wait([self.placement_group.ready()], timeout=self.ready_timeout_s)
        if not ready:
            self.stop()
            raise RoleError(f"Ray cannot place {len(self.layout)} workers x {bundle} "
                            f"(available: {ray.available_resources()}); lower cpus_per_worker, "
                            "colocate roles or add nodes")
        self.handles = [self._create(i) for i in range(len(self.layout))]
        try:
            ray.get([h.ping.remote() for h in self.handles], timeout=self.ready_timeout_s)
        except ray.exceptions.RayError as exc:  # a role's __init__ raised (bad model, ...)
            self.stop()
            raise RoleError(f"a PPO role failed to start: {str(exc).strip()[-800:]}") from exc
        self.connect_actor_workers()

    def _create(self, index: int) -> Any:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        roles = self.layout[index]
        rank = index if "actor" in roles else 0
        remote_cls = ray.remote(RoleHost)
        return remote_cls.options(
            num_cpus=self.cfg.cpus_per_worker, num_gpus=self.cfg.gpus_per_worker,
            max_restarts=self.cfg.max_step_retries, max_task_retries=0,
            name=None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self.placement_group, placement_group_bundle_index=index),
        ).remote(roles, self.cfg, rank, self.cfg.actor_workers)

    def connect_actor_workers(self) -> None:
        import ray

        if self.cfg.actor_workers == 1:
            return
        address, port = ray.get(self.actors[0].rendezvous.remote())
        ray.get([h.call.remote("actor", "init_process_group", address, port)
                 for h in self.actors])

    def revive(self) -> list[int]:
        """Replace hosts that are dead for good; returns the indices of every host that lost
        its state (dead or restarted by Ray), which then need restoring from a checkpoint."""
        import ray
        from ray.exceptions import RayActorError

        lost = []
        for index, handle in enumerate(self.handles):
            try:
                ray.get(handle.ping.remote(), timeout=self.ready_timeout_s)
            except (RayActorError, ray.exceptions.GetTimeoutError):
                self.handles[index] = self._create(index)
                ray.get(self.handles[index].ping.remote(), timeout=self.ready_timeout_s)
            lost.append(index)
        self.connect_actor_workers()
        return lost

    def stop(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for handle in self.handles:
            ray.kill(handle)
        self.handles = []
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None

    # --- routing ------------------------------------------------------------------------
    def _host_of(self, role: str) -> Any:
        for handle, roles in zip(self.handles, self.layout, strict=True):
            if role in roles:
                return handle
        raise RoleError(f"no host for role {role!r}")

    @property
    def actors(self) -> list[Any]:
        return [h for h, roles in zip(self.handles, self.layout, strict=True) if "actor" in roles]

    def ref_for(self, shard_index: int) -> Any:
        """The reference that scores shard i: the actor worker's own when colocated."""
        return self.actors[shard_index] if self.cfg.colocate_actor_ref else self._host_of("ref")

    @property
    def critic(self) -> Any:
        return self._host_of("critic")

    @property
    def reward(self) -> Any:
        return self._host_of("reward")

    @property
    def ray_actor_count(self) -> int:
        return len(self.handles)


__all__ = [
    "ActorRole",
    "CriticRole",
    "ReferenceRole",
    "RewardRole",
    "RoleError",
    "RoleGroup",
    "RoleHost",
    "RolloutShard",
    "SequenceBatch",
    "StepOrderError",
    "chat_turn_suffix",
    "collate_rollouts",
    "hosts_for",
    "last_token_scores",
    "load_scalar_model",
    "lr_factor",
    "minibatch_order",
    "pad_right",
    "policy_logps",
    "resolve_model_folder",
    "token_values",
]
