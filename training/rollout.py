"""Rollout engines: the policy generates completions (with per-token log-probs) for online RL.

One protocol, `RolloutEngine`, three implementations:
- `HFRolloutEngine` (here): Hugging Face transformers on CPU or one GPU, with its own decode loop:
  prompts left-padded and batched, the prompt prefilled once and its key/value cache shared by the
  n samples of that prompt, finished rows dropped from the batch, stop strings, one seeded
  generator per sample (so a sample depends on (seed, prompt index, sample index), not on what
  else was in the batch), and the log-prob of every sampled token returned;
- `VLLMRolloutEngine` (training/rollout_vllm.py): `vllm.LLM` on GPUs, tensor-parallel;
- `RayRolloutEngine` (training/rollout_ray.py): either of them inside a Ray actor, driven from the
  learner, with the learner's weights pushed after each update (`load_state_dict`; see
  `policy_weights_for_sync`); `make_engine` there builds one by name.

    python -c "from training.rollout import HFRolloutEngine, SamplingParams as S; \
e = HFRolloutEngine('smollm2-135m-instruct', dtype='bfloat16'); \
print(e.generate([[{'role': 'user', 'content': 'Hi!'}]], S(max_new_tokens=20, n=2, seed=0)))"
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

PromptInput = str | list[dict[str, str]]
"""A chat (list of messages) gets the chat template + generation prompt; a str is used as is."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. temperature = 0 means greedy decoding."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    """Samples per prompt."""
    stop: tuple[str, ...] = ()
    """Generation ends when the text contains one of these; the text is cut before it."""
    include_stop: bool = False
    """Keep the stop string at the end of the text (vLLM's include_stop_str_in_output), e.g.
    stop = ("</answer>",) with a reward that checks the closing tag."""
    seed: int | None = None
    """Same seed, same prompts, same weights -> the same samples. None: fresh randomness."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.n < 1:
            raise ValueError("n must be >= 1")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


@dataclass(frozen=True)
class Rollout:
    """One sampled completion.

    `completion_ids` and `logprobs` cover every sampled token, including the end-of-sequence token
    or the token that completed a stop string (the policy is trained on what it sampled); `text`
    is the decoded completion without special tokens, cut before the stop string.
    """

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    logprobs: list[float]
    """log pi(token) under the sampling distribution actually used: log_softmax(logits / T)
    (T = 1 for greedy decoding; before top-p truncation)."""
    finish_reason: str
    """"stop" (end-of-sequence token or a stop string) or "length" (max_new_tokens reached)."""


class RolloutEngine(Protocol):
    """What the online algorithms need from a generator."""

    def generate(self, prompts: Sequence[PromptInput], params: SamplingParams
                 ) -> list[list[Rollout]]:
        """One list per prompt, each with params.n rollouts (sample_index 0..n-1)."""
        ...

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Weight sync from the learner: copy these tensors (a full or partial state dict with the
        model's own parameter names) into the generating model."""
        ...

    def load_weights_from(self, model_dir: str) -> None:
        """Replace the weights with those of a saved model folder."""
        ...


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The generator seed of one sample: a fixed mixing of (request seed, prompt, sample)."""
    return ((seed * 1_000_003 + prompt_index) * 1_009 + sample_index) % (2**63 - 1)


def encode_prompt(tokenizer: Any, prompt: PromptInput) -> list[int]:
    """Token ids of a prompt, as training.data.encode_prompt_completion encodes prompts."""
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    raise TypeError(f"a prompt is a string or a list of chat messages, got {type(prompt)}")


def _cache_argument(model: Any) -> str:
    import inspect

    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    if name == "auto":
        # bf16 only where the CPU has bf16 matmuls (AVX512-BF16/AMX) or on a GPU: on an
        # AVX2-only CPU a bf16 matmul is emulated and measured ~60x slower than fp32.
        from training.runtime import bf16_supported

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.bfloat16 if bf16_supported(device) else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype must be auto or one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]


def load_fresh_causal_lm(model: str, dtype: torch.dtype) -> Any:
    """A causal LM from a name or folder; a LoRA adapter folder is merged and the merged weights
    are loaded into a fresh model, which generates 1.6-2x faster than the merged-in-place one
    (PLATFORM.md section 13)."""
    from transformers import AutoModelForCausalLM

    from training.models import load_policy, resolve_model

    path = resolve_model(model)
    merged = load_policy(path, dtype=dtype)
    if not (Path(path) / "adapter_config.json").exists():
        return merged
    fresh = AutoModelForCausalLM.from_config(merged.config, dtype=dtype)
    fresh.load_state_dict(merged.state_dict())
    return fresh


class HFRolloutEngine:
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
        self.dtype = _torch_dtype(dtype)
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

    # ------------------------------------------------------------------ weights

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        import torch

        own = self.model.state_dict()
        unknown = sorted(set(state) - set(own))
        if unknown:
            raise KeyError(f"weights not in the rollout model: {unknown[:5]}")
        with torch.no_grad():
            for name, tensor in state.items():
                if own[name].shape != tensor.shape:
                    raise ValueError(f"{name}: shape {tuple(tensor.shape)} != "
                                     f"{tuple(own[name].shape)}")
                own[name].copy_(tensor.to(device=own[name].device, dtype=own[name].dtype))

    def load_weights_from(self, model_dir: str) -> None:
        self.model = load_fresh_causal_lm(model_dir, self.dtype).to(self.device).eval()

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


# ---------------------------------------------------------------------- weight sync


def policy_weights_for_sync(model: Any, *, dtype: torch.dtype | None = None
                            ) -> dict[str, torch.Tensor]:
    """The tensors a rollout engine needs to match the learner's policy, by plain HF names.

    A PEFT LoRA model sends only the wrapped layers' merged weights W + (alpha/r) B A (computed
    without touching the learner's model); a plain model sends all its parameters. Either way the
    result can be passed to `RolloutEngine.load_state_dict`.
    """
    import torch

    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if hasattr(model, "peft_config"):
            from peft.tuners.lora import LoraLayer

            prefix = "base_model.model."
            for name, module in model.named_modules():
                if not isinstance(module, LoraLayer):
                    continue
                lora: Any = module
                base = lora.get_base_layer()
                weight = base.weight.detach()
                if not lora.merged:
                    for adapter in lora.active_adapters:
                        weight = weight + lora.get_delta_weight(adapter)
                clean = name[len(prefix):] if name.startswith(prefix) else name
                out[f"{clean}.weight"] = weight.to(dtype or weight.dtype).cpu().clone()
        else:
            for name, param in model.named_parameters():
                out[name] = param.detach().to(dtype or param.dtype).cpu().clone()
    return out


__all__ = [
    "HFRolloutEngine",
    "PromptInput",
    "Rollout",
    "RolloutEngine",
    "SamplingParams",
    "encode_prompt",
    "policy_weights_for_sync",
    "sample_seed",
]
