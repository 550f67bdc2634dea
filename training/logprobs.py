"""Run a model on a collated batch and return what the losses need: completion log-probs, rewards.

These are the only functions that call a model's forward in the offline algorithms; Training II
(PPO, GRPO, rejection sampling) reuses `completion_logps` for policy and reference log-probs.

Speed: logits are requested only for the positions that predict completion tokens
(`logits_to_keep`), so the (B, T, V) logits tensor - the largest activation of a small model with a
49k vocabulary - is not built over the prompt.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from training.losses import token_logps


@dataclass
class CompletionLogps:
    """Summed log-probs of each sequence's completion, and the per-token values behind them."""

    logps: torch.Tensor  # (N,) sum over completion tokens of log pi(y_t | x, y_<t)
    lengths: torch.Tensor  # (N,) completion tokens per sequence
    per_token: torch.Tensor  # (N, K) log-probs of the last K target positions (0 off-mask)
    mask: torch.Tensor  # (N, K) 1 where per_token belongs to the completion


def completion_logps(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
) -> CompletionLogps:
    """Log-probabilities of the completion tokens under a causal LM, in one forward pass.

    Args:
        model: a causal LM (plain, PEFT-wrapped or a DeepSpeed engine) accepting `logits_to_keep`.
        input_ids: (N, T) right-padded prompt+completion ids.
        attention_mask: (N, T).
        completion_mask: (N, T) 1 on completion tokens.
    """
    width = input_ids.shape[1]
    has_completion = completion_mask.any(dim=0).nonzero()
    first = int(has_completion[0]) if len(has_completion) else width - 1
    first = max(first, 1)  # position 0 is never predicted
    keep = width - first + 1  # positions first-1 .. T-1; the last one predicts nothing
    outputs = model(
        input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False
    )
    logits = outputs.logits[:, :-1]  # (N, K, V), K = T - first: position t predicts token t+1
    targets = input_ids[:, first:]
    mask = completion_mask[:, first:].to(torch.float32)
    per_token = token_logps(logits, targets) * mask
    return CompletionLogps(per_token.sum(-1), mask.sum(-1), per_token, mask)


def sequence_rewards(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """Scalar reward of each sequence: the score head applied to its last real token.

    The head is applied to the hidden state at the last non-padding position found from the
    attention mask (not from pad ids, which are ambiguous when pad = EOS).

    Args:
        model: an `AutoModelForSequenceClassification` with one label (possibly PEFT-wrapped).
        input_ids, attention_mask: (N, T) right-padded.

    Returns:
        (N,) float32 rewards.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base = getattr(base, "module", base)  # a DeepSpeed engine wraps the model in .module
    backbone = getattr(base, base.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
    last = attention_mask.sum(dim=1) - 1  # (N,)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (N, H)
    return base.score(pooled).squeeze(-1).float()


def _cache_argument(model: Any) -> str:
    """Name of the KV-cache argument/output: `cache` in transformers >= 5.2x, else the older
    `past_key_values` (looked up on the innermost model, through PEFT and DeepSpeed wrappers)."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    parameters = inspect.signature(inner.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def input_embeddings(model: Any) -> torch.nn.Module:
    """The token-embedding module of a causal LM, through PEFT and DeepSpeed wrappers."""
    return getattr(model, "module", model).get_input_embeddings()


def shared_prompt_pair_logps(
    model: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
) -> CompletionLogps:
    """Completion log-probs of K completions per prompt, running each prompt through the model once.

    A preference pair shares its prompt, and prompts are usually much longer than the answers
    (PLATFORM.md section 13: ~107 prompt tokens, ~20 answer tokens). Instead of two full sequences
    per pair, each prompt *except its last token* goes through the model once with
    `use_cache=True`; the key/value cache is repeated K times, and every completion is run on top
    of it with the prompt's last token in front. Gradients flow through the cache, so this is exact
    (equal to the full-sequence forward up to float rounding), and it cuts the tokens processed per
    pair from 2(P + C) to P + 2(C + 1) - in the forward, the backward, and the reference.

    Feeding the last prompt token again costs one token per completion and buys two things that
    matter on a small model with a 49k vocabulary: the output layer runs once per call, on the
    completion pass only (the prompt pass's logits are never used, so the backward never reaches
    them), and both passes take their input embeddings from one lookup, so the dense (V, H)
    embedding and output-layer gradients are each built once per call instead of twice.

    Args:
        model: a causal LM taking `past_key_values` and `inputs_embeds` (not with gradient
            checkpointing, which turns the cache off in training).
        prompt_ids: (B, P) prompts, *left*-padded so that every prompt ends at column P-1.
        prompt_mask: (B, P) attention mask of the prompts.
        completion_ids: (B*K, C) right-padded completions; rows k*... are ordered prompt-major:
            row b*K + j is completion j of prompt b.
        completion_mask: (B*K, C) 1 on real completion tokens.
        temperature: the logits are divided by it (a sampling temperature; 1 = unchanged).

    Returns:
        CompletionLogps with (B*K,) summed log-probs, in the row order of completion_ids.
    """
    batch, width = prompt_ids.shape
    repeats = completion_ids.shape[0] // batch
    length = completion_ids.shape[1]
    last = prompt_ids[:, -1:].repeat_interleave(repeats, dim=0)  # (BK, 1)
    tail_ids = torch.cat([last, completion_ids], dim=1)  # (BK, 1 + C)
    head_ids, head_mask = prompt_ids[:, :-1], prompt_mask[:, :-1]
    embeds = input_embeddings(model)(torch.cat([head_ids.reshape(-1), tail_ids.reshape(-1)]))
    hidden = embeds.shape[-1]
    head_embeds = embeds[: head_ids.numel()].view(batch, width - 1, hidden)
    tail_embeds = embeds[head_ids.numel():].view(tail_ids.shape[0], length + 1, hidden)
    cache_name = _cache_argument(model)
    cached: dict[str, Any] = {}
    if width > 1:  # with one-token prompts there is nothing to cache
        head_positions = (head_mask.cumsum(dim=1) - 1).clamp(min=0)
        head_out = model(inputs_embeds=head_embeds, attention_mask=head_mask,
                         position_ids=head_positions, use_cache=True, logits_to_keep=1)
        cache = getattr(head_out, cache_name)
        cache.batch_repeat_interleave(repeats)
        cached[cache_name] = cache
    # The last prompt token sits at position (prompt length - 1); completion token t follows it.
    prompt_lengths = prompt_mask.sum(dim=1).repeat_interleave(repeats)  # (BK,)
    positions = (prompt_lengths - 1).unsqueeze(1) + torch.arange(length + 1,
                                                                  device=tail_ids.device)
    attention = torch.cat([head_mask.repeat_interleave(repeats, dim=0), torch.ones_like(last),
                           completion_mask], dim=1)
    # Positions 0..C-1 of the tail predict completion tokens 0..C-1; the last one predicts nothing.
    keep = torch.arange(length, device=tail_ids.device)
    logits = model(inputs_embeds=tail_embeds, attention_mask=attention, position_ids=positions,
                   use_cache=True, logits_to_keep=keep, **cached).logits  # (BK, C, V)
    if temperature not in (0.0, 1.0):
        logits = logits.float() / temperature
    mask = completion_mask.to(torch.float32)
    per_token = token_logps(logits, completion_ids) * mask
    return CompletionLogps(per_token.sum(-1), mask.sum(-1), per_token, mask)
