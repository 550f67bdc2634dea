"""The four PPO roles - actor, reference, critic, reward - as plain Python classes.

OpenRLHF's layout (Hu et al. 2024, arXiv:2405.11143, Sec. 3): the actor generates rollouts and
takes clipped-PPO (+ptx) steps, the reference gives the KL penalty's log-probs, the critic the
values (trained with the clipped value loss), the reward the sequence scores. Each is usable and
testable without Ray; training.ray_roles hosts them in Ray actors. The batch layout and forwards
are training.ppo_batch, the math training.rl_losses.

    python -c "from training.ppo_roles import ActorRole; help(ActorRole)"
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.optim import lr_schedule, optimizer_step
from training.policy import freeze, trainable_parameters, trainable_state, uses_lora, with_lora
from training.ppo_batch import (
    RoleError,
    RolloutShard,
    SequenceBatch,
    StepLedger,
    chat_turn_suffix,
    collate_rollouts,
    last_token_scores,
    load_scalar_model,
    minibatch_order,
    pad_right,
    policy_logps,
    resolve_model_folder,
    token_values,
)
from training.ppo_config import PPOConfig
from training.runtime import select_device

if TYPE_CHECKING:
    import torch


def _optimizer(params: list[Any], lr: float, cfg: PPOConfig, total_steps: int) -> tuple[Any, Any]:
    import torch

    optimizer = torch.optim.AdamW(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(
        warmup_steps=cfg.warmup_steps, total_steps=total_steps, schedule=cfg.lr_schedule,
        min_lr_ratio=cfg.min_lr_ratio))
    return optimizer, scheduler


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
        grad_norm = optimizer_step(self.trainable, self.optimizer, self.cfg.max_grad_norm,
                                   self.scheduler)
        self.ledger.optimizer_steps += 1
        return grad_norm

    def state(self) -> dict[str, Any]:
        return {"trainable": trainable_state(self.model),
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
        return trainable_state(self.model)

    def optimizer_steps(self) -> int:
        return self.ledger.optimizer_steps


class ActorRole(_TrainedRole):
    """The policy: generates rollouts (through a rollout engine synced with its weights),
    computes advantages for its shard, and takes clipped-PPO (+ptx) optimizer steps."""

    role_name = "actor"

    def __init__(self, cfg: PPOConfig, rank: int = 0, world_size: int = 1):
        import torch

        from training.models import load_policy, load_tokenizer, resolve_model
        from training.rollout_ray import make_engine

        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = select_device(cfg.device)
        self.tokenizer = load_tokenizer(cfg.model)
        self.pad_id = int(self.tokenizer.pad_token_id)
        torch.manual_seed(cfg.seed)
        model: Any = load_policy(cfg.model, dtype=torch.float32)
        self.lora = uses_lora(cfg.lora, self.device)
        if self.lora:
            model = with_lora(model, cfg, "CAUSAL_LM", RoleError)
        self.model = model.to(self.device)
        self.trainable = trainable_parameters(self.model)
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
        from training.rl_losses import shard_advantages, shard_moments

        self._check_experience(step)
        exp = self.experience
        mask = exp["batch"].completion_mask
        cfg = self.cfg
        out = shard_advantages(old_logp=exp["old_logp"], ref_logp=ref_logp, values=values,
                               scores=scores, mask=mask, kl_coef=kl_coef,
                               kl_estimator=cfg.kl_estimator,
                               advantage_estimator=cfg.advantage_estimator, gamma=cfg.gamma,
                               lam=cfg.lam)
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

        from training.rl_losses import clipped_policy_loss, ptx_combined_loss

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
        from training.models import record_adapter_base

        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        record_adapter_base(folder)

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

        self.cfg, self.device = cfg, select_device(cfg.device)
        self.pad_id = int(load_tokenizer(cfg.model).pad_token_id)
        policy: Any = load_policy(cfg.model, dtype=torch.float32)
        self.model = freeze(policy.to(self.device).eval())

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

        self.cfg, self.device = cfg, select_device(cfg.device)
        self.pad_id = int(load_tokenizer(cfg.model).pad_token_id)
        torch.manual_seed(cfg.seed + 1)  # a fresh value head (critic from a causal LM) is seeded
        model = load_scalar_model(cfg.critic_source, self.pad_id)
        if uses_lora(cfg.lora, self.device):
            # SEQ_CLS keeps the value head fully trainable.
            model = with_lora(model, cfg, "SEQ_CLS", RoleError)
        self.model = model.to(self.device)
        self.trainable = trainable_parameters(self.model)
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

        self.cfg, self.device = cfg, select_device(cfg.device)
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


__all__ = ["ActorRole", "CriticRole", "ReferenceRole", "RewardRole"]
