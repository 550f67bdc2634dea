"""What the generation engine (training/generation.py) takes and gives: a sequence request, its
result and the events streamed while it runs; incremental text with stop strings; prompt
encoding. Plain data and pure functions, no torch.

    python -c "from training.sequences import StopText; s = StopText(['END']); \
print(repr(s.feed('abcEN')), repr(s.feed('abcENDxyz')), s.text)"
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

PromptInput = str | list[dict[str, str]]
"""A chat (list of messages) gets the chat template + generation prompt; a str is used as is."""

def check_sampling(max_new_tokens: int, temperature: float, top_p: float,
                   stop: Sequence[str]) -> None:
    """ValueError naming the first sampling setting out of range."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if temperature < 0:
        raise ValueError("temperature must be >= 0 (0 = greedy)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError("top_p must be in (0, 1]")
    if any(not s for s in stop):
        raise ValueError("stop strings must be non-empty")


@dataclass(frozen=True)
class SequenceRequest:
    """One sequence to generate.

    `logprobs` of the result are under the sampling distribution log_softmax(logits / T) (what
    RL importance ratios need); `top_logprobs = k` also records, per token, its log-probability
    under the model itself (T = 1, OpenAI's and vLLM's `logprobs`) and the k likeliest tokens.
    """

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    include_stop: bool = False
    seed: int | None = None
    top_logprobs: int | None = None
    stream: bool = False

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("the prompt is empty")
        check_sampling(self.max_new_tokens, self.temperature, self.top_p, self.stop)


@dataclass(frozen=True)
class TokenAlternatives:
    """A generated token's log-probability under the model and the k likeliest tokens there."""

    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class SequenceResult:
    prompt_ids: list[int]
    completion_ids: list[int]
    """Every sampled token, the end-of-sequence token or the one completing a stop string
    included (the policy is trained on what it sampled)."""
    text: str
    """The decoded completion without special tokens, cut before the stop string (after it
    with include_stop)."""
    logprobs: list[float]
    finish_reason: str
    """"stop" (end of sequence or a stop string), "length" (token budget or context), or
    "cancelled"."""
    alternatives: list[TokenAlternatives] | None = None


@dataclass(frozen=True)
class TextDelta:
    """Newly generated text (only for stream=True; never part of a stop string)."""

    text: str


@dataclass(frozen=True)
class Finished:
    result: SequenceResult


@dataclass(frozen=True)
class Errored:
    error: Exception


EngineEvent = TextDelta | Finished | Errored
Sink = Callable[[EngineEvent], None]


class EngineClosed(RuntimeError):
    """The engine was closed (its model unloaded)."""


class StopText:
    """Incremental text with stop strings: `feed(full_text)` returns the text that is safe to
    emit now. Text that could be the start of a stop string is held back until it is not, and
    the text is cut before the first stop string found (after it with `include`), which sets
    `stopped`."""

    def __init__(self, stop: Sequence[str], include: bool = False):
        self.stop = [s for s in stop if s]
        self.include = include
        self.emitted = 0
        self.stopped = False
        self.text = ""

    def feed(self, text: str, *, final: bool = False) -> str:
        if self.stopped:
            return ""
        found = [(i, s) for s in self.stop if (i := text.find(s)) >= 0]
        if found:
            cut, stop = min(found)
            text, final, self.stopped = text[:cut + (len(stop) if self.include else 0)], True, True
        self.text = text
        if final:
            safe = len(text)
        else:
            # A trailing U+FFFD is half a multi-byte character still being generated.
            settled = text.rstrip("\ufffd")
            safe = len(settled) - self._partial_stop(settled)
        out = text[self.emitted:max(self.emitted, safe)]
        self.emitted = max(self.emitted, safe)
        return out

    def _partial_stop(self, text: str) -> int:
        """Length of the longest end of `text` that a stop string starts with."""
        longest = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest


def encode_prompt(tokenizer: Any, prompt: PromptInput) -> list[int]:
    """Token ids of a prompt: a chat gets the template and the generation prompt; a string is
    tokenized as is (with the tokenizer's own special tokens)."""
    if isinstance(prompt, list):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template: give a text prompt")
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    raise TypeError(f"a prompt is a string or a list of chat messages, got {type(prompt)}")


def common_prefix(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix shared by every sequence."""
    first = sequences[0]
    length = min(len(s) for s in sequences)
    for other in sequences[1:]:
        length = next((i for i in range(length) if other[i] != first[i]), length)
    return length


__all__ = ["EngineClosed", "EngineEvent", "Errored", "Finished", "PromptInput",
           "SequenceRequest", "SequenceResult", "Sink", "StopText", "TextDelta",
           "TokenAlternatives", "check_sampling", "common_prefix", "encode_prompt"]
