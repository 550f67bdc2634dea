"""The rollout engine prefloop had before the generation engine (training/generation.py): a
Hugging Face model called step by step with its DynamicCache, static batches (a finished row
leaves, none joins), one torch.Generator and one multinomial call per row. Kept here, unchanged
but for imports, only as the baseline `benchmarks/generation_engine.py` measures against in the
same run; nothing in prefloop imports it.
"""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from training.models import load_fresh_causal_lm, torch_dtype
from training.rollout import PromptInput, Rollout, SamplingParams, encode_prompt, sample_seed

if TYPE_CHECKING:
    import torch


def _cache_argument(model: Any) -> str:
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class HFLoopRolloutEngine:
    """Batched sampling with a Hugging Face causal LM and a KV cache.

    Args:
        model: a bundled name, a model folder (or LoRA adapter folder) or a hub id.
        tokenizer: defaults to the model's.
        dtype: float32, bfloat16 (about 2x faster on CPUs with AVX512-BF16, PLATFORM.md
            section 13) or float16.
        batch_size: sequences decoded together (a prompt's n samples count as n).
        device: cpu or cuda.
    """

    def __init__(self, model: str, *, tokenizer: str | None = None, dtype: str = "float32",
                 batch_size: int = 16, device: str = "cpu"):
        import torch

        from training.models import load_tokenizer

        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.dtype = torch_dtype(dtype)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.tokenizer = load_tokenizer(tokenizer or model)
        self.model = load_fresh_causal_lm(model, self.dtype).to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.pad_id = int(self.tokenizer.pad_token_id)
        # transformers >= 5.2x renamed the cache argument/output to `cache`.
        self._cache_name = _cache_argument(self.model)

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: Sequence[PromptInput], params: SamplingParams
                 ) -> list[list[Rollout]]:
        import torch

        encoded = [encode_prompt(self.tokenizer, p) for p in prompts]
        if any(not ids for ids in encoded):
            raise ValueError("empty prompt")
        seed = params.seed if params.seed is not None else secrets.randbits(62)
        results: list[list[Rollout]] = [[] for _ in prompts]
        prompts_per_batch = max(1, self.batch_size // params.n)
        # Similar lengths together: less left padding to compute over.
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        with torch.inference_mode():
            for start in range(0, len(order), prompts_per_batch):
                group = order[start : start + prompts_per_batch]
                for rollout in self._generate_group([encoded[i] for i in group], group, params,
                                                    seed):
                    results[rollout.prompt_index].append(rollout)
        for samples in results:
            samples.sort(key=lambda r: r.sample_index)
        return results

    def _pick_tokens(self, logits: torch.Tensor, params: SamplingParams,
                     generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """Next token of each row and its log-prob under log_softmax(logits / T)."""
        import torch

        scores = logits.float()
        if params.temperature == 0:
            logprobs = torch.log_softmax(scores, dim=-1)
            tokens = scores.argmax(dim=-1)
        else:
            logprobs = torch.log_softmax(scores / params.temperature, dim=-1)
            probs = logprobs.exp()
            if params.top_p < 1.0:
                # Nucleus sampling (Holtzman et al. 2020): keep the smallest set of most likely
                # tokens whose mass reaches top_p (always at least the top token).
                sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
                outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= params.top_p
                sorted_probs = sorted_probs.masked_fill(outside, 0.0)
                probs = torch.zeros_like(probs).scatter(-1, sorted_ids, sorted_probs)
            tokens = torch.stack([torch.multinomial(probs[row], 1, generator=generator)[0]
                                  for row, generator in enumerate(generators)])
        picked = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return tokens, picked

    def _generate_group(self, prompt_ids: list[list[int]], prompt_indices: list[int],
                        params: SamplingParams, seed: int) -> list[Rollout]:
        import torch

        n, device = params.n, self.device
        width = max(len(ids) for ids in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for row, ids in enumerate(prompt_ids):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, width - len(ids):] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
        # Prefill each prompt once, then share its cache across its n samples.
        out = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                         use_cache=True, logits_to_keep=1)
        cache = getattr(out, self._cache_name)
        logits = out.logits[:, -1].repeat_interleave(n, dim=0)  # (R, V), R = prompts * n
        if n > 1:
            cache.batch_repeat_interleave(n)
            attention = attention.repeat_interleave(n, dim=0)
        rows = len(prompt_ids) * n
        next_position = attention.sum(dim=1)  # (R,) position of the next token
        generators = [torch.Generator().manual_seed(
            sample_seed(seed, prompt_indices[r // n], r % n)) for r in range(rows)]
        completions: list[list[int]] = [[] for _ in range(rows)]
        logprobs: list[list[float]] = [[] for _ in range(rows)]
        finish = [""] * rows
        active = list(range(rows))  # original row of each row still in the batch
        longest_stop = max((len(s) for s in params.stop), default=0)
        for step in range(params.max_new_tokens):
            tokens, picked = self._pick_tokens(logits, params, [generators[r] for r in active])
            keep: list[int] = []
            for position, row in enumerate(active):
                token = int(tokens[position])
                completions[row].append(token)
                logprobs[row].append(float(picked[position]))
                hit_stop = bool(longest_stop) and self._hits_stop(completions[row],
                                                                  params.stop, longest_stop)
                if token in self.eos_ids or hit_stop:
                    finish[row] = "stop"
                elif step + 1 == params.max_new_tokens:
                    finish[row] = "length"
                else:
                    keep.append(position)
            if not keep:
                break
            if len(keep) < len(active):  # drop finished rows from the batch and the cache
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                attention, next_position = attention[index], next_position[index]
                tokens = tokens[index]
                active = [active[k] for k in keep]
            attention = torch.cat([attention, attention.new_ones((len(active), 1))], dim=1)
            out = self.model(input_ids=tokens.unsqueeze(1).to(device), attention_mask=attention,
                             position_ids=next_position.unsqueeze(1), use_cache=True,
                             **{self._cache_name: cache})
            cache, logits = getattr(out, self._cache_name), out.logits[:, -1]
            next_position = next_position + 1
        return [
            Rollout(prompt_index=prompt_indices[row // n], sample_index=row % n,
                    prompt_ids=list(prompt_ids[row // n]), completion_ids=completions[row],
                    text=self._final_text(completions[row], params.stop, params.include_stop),
                    logprobs=logprobs[row], finish_reason=finish[row])
            for row in range(rows)
        ]

    def _hits_stop(self, completion: list[int], stop: tuple[str, ...], longest: int) -> bool:
        # A stop string of L characters spans at most L tokens; earlier occurrences would have
        # ended the row at an earlier step, so decoding the tail is enough.
        tail = str(self.tokenizer.decode(completion[-(longest + 1):], skip_special_tokens=True))
        return any(s in tail for s in stop)

    def _final_text(self, completion: list[int], stop: tuple[str, ...], include: bool) -> str:
        text = str(self.tokenizer.decode(completion, skip_special_tokens=True))
        cuts = [(text.find(s), len(s)) for s in stop if s in text]
        if not cuts:
            return text
        start, length = min(cuts)
        return text[: start + length] if include else text[:start]
