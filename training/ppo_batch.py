"""What the four PPO roles share: the batch layout, the model forwards, the step ledger.

Batch layout shared by every role (what `collate_rollouts` builds): prompts left-padded to width
P, completions right-padded to width C, so per-token tensors are (B, C) with the completion mask
1 on generated tokens (the layout of training.rl_losses). Position ids come from the attention
mask, so left padding does not shift positions.

Step ids make the stateful updates idempotent: `StepLedger.check(step)` lets step k through only
after k-1, and a repeated delivery of step k returns the recorded result without a second
optimizer step. The roles are training.ppo_roles; their Ray hosting is training.ray_roles.

    python -c "from training.ppo_batch import collate_rollouts as c; print(c([[1, 2]], [[3]], 0))"
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    from transformers import AutoModelForSequenceClassification

    from training.models import load_adapter, load_reward_backbone

    resolved = resolve_model_folder(path)
    if (Path(resolved) / "adapter_config.json").exists():
        # Through training.models: the adapter's base is found even after the folder moved.
        model = load_adapter(resolved, AutoModelForSequenceClassification, num_labels=1,
                             dtype=torch.float32)
        model.config.pad_token_id = pad_token_id
        return model
    return load_reward_backbone(resolved, pad_token_id, dtype=torch.float32)


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


# ------------------------------------------------------------------------------ step ids


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


__all__ = [
    "RoleError",
    "RolloutShard",
    "SequenceBatch",
    "StepLedger",
    "StepOrderError",
    "chat_turn_suffix",
    "collate_rollouts",
    "last_token_scores",
    "load_scalar_model",
    "minibatch_order",
    "pad_right",
    "policy_logps",
    "resolve_model_folder",
    "token_values",
]
