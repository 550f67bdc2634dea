"""The in-process generation engine: continuous batching over the fused decoder
(training/decoder.py). Serving (/v1, and the AI judge through it), rollouts and evaluation all
generate through it.

- Requests join and leave the running batch at every step: a new request's prompt is
  prefilled in the same forward pass in which the running ones decode a token (one pass over
  the weights), and it samples its first token in that step; a finished or cancelled one
  leaves and its cache slot is reused.
- Requests that share a prompt (a rollout's n samples) prefill it once; requests that share a
  prefix (a chat template's system prompt, a judge's instructions) reuse its keys/values.
- Each request has its own temperature, top-p, stop strings, token budget and random stream
  (`seed`): the same seed and weights give the same tokens whatever else is in the batch.
- `submit` streams events to a callback (TextDelta as the text grows, then Finished or
  Errored) and returns a handle whose `cancel()` takes the request out at the next step;
  `run` generates a list of requests to the end (rollouts, evaluation).
- The batch is capped (`max_batch`), and the KV cache by `kv_cache_gb`: what does not fit waits.

    python -c "from training.generation import GenerationEngine, SequenceRequest as R; \
e = GenerationEngine.from_pretrained('smollm2-135m-instruct'); \
print(e.run([R(tuple(e.encode([{'role': 'user', 'content': 'Hi!'}])), 20, seed=0)])[0].text)"
"""

from __future__ import annotations

import contextlib
import random
import secrets
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from training.sequences import (
    EngineClosed,
    EngineEvent,
    Errored,
    Finished,
    PromptInput,
    SequenceRequest,
    SequenceResult,
    Sink,
    StopText,
    TextDelta,
    TokenAlternatives,
    common_prefix,
    encode_prompt,
)

if TYPE_CHECKING:
    import torch

    from training.decoder import FusedDecoder, SlotCache

MIN_PREFIX = 16  # shorter shared prefixes are not worth a second prefill call
PREFILL_CHUNK = 512  # prompt tokens per prefill call (attention memory grows with its square)


@dataclass(eq=False)
class _Sequence:
    request: SequenceRequest
    sink: Sink
    rng: random.Random
    cancelled: threading.Event = field(default_factory=threading.Event)
    completion: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    alternatives: list[TokenAlternatives] = field(default_factory=list)
    text: StopText | None = None
    cached: int = 0  # positions of this sequence in its cache slot
    finish: str = ""

    def send(self, event: EngineEvent) -> None:
        # A receiver that went away (its event loop closed) must not stop the engine.
        try:
            self.sink(event)
        except Exception:
            self.cancelled.set()


@dataclass(frozen=True)
class Handle:
    """A submitted request: `cancel()` takes it out of the batch at the next step."""

    _sequence: _Sequence

    def cancel(self) -> None:
        self._sequence.cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._sequence.cancelled.is_set()


class GenerationEngine:
    """Continuous batching for one causal LM in this process (see the module docstring).

    Args:
        model: a Hugging Face causal LM of a layout training/decoder.py supports.
        tokenizer: its tokenizer.
        max_batch: sequences decoded together at most.
        max_context: prompt + new tokens of one sequence at most (default: the model's).
        kv_cache_gb: the KV cache's size at most; requests that would exceed it wait.
        prefill_tokens: prompt tokens prefilled in one step at most (a wave of new requests
            is spread over several steps, so running ones keep streaming).
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_batch: int = 32,
                 max_context: int | None = None, kv_cache_gb: float = 4.0,
                 prefill_tokens: int = 2048):
        from training.decoder import FusedDecoder

        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.decoder: FusedDecoder = FusedDecoder(self.model, batch_hint=max_batch)
        self.max_batch = max_batch
        self.max_context = min(max_context or self.decoder.max_positions,
                               self.decoder.max_positions)
        self.prefill_tokens = max(1, prefill_tokens)
        self.cache: SlotCache = self.decoder.new_cache()
        per_position = self.cache.bytes_per_position()
        self.kv_positions = max(self.max_context, int(kv_cache_gb * 2**30 // per_position))
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos_ids = set(eos if isinstance(eos, list | tuple) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self._pending: deque[_Sequence] = deque()
        self._active: list[_Sequence] = []  # index = cache slot
        self._admitting: list[_Sequence] = []  # taken from the queue, not yet in the batch
        self._prefix: tuple[tuple[int, ...], Any, Any] | None = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._step_lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.tokens_generated = 0
        self.peak_batch = 0  # most sequences decoded together so far

    @classmethod
    def from_pretrained(cls, model: str, *, dtype: str = "float32", device: str = "cpu",
                        tokenizer: str | None = None, **kwargs: Any) -> GenerationEngine:
        """An engine for a bundled name, a model folder or a LoRA adapter folder."""
        from training.models import load_fresh_causal_lm, load_tokenizer, torch_dtype

        loaded = load_fresh_causal_lm(model, torch_dtype(dtype)).to(device)
        return cls(loaded, load_tokenizer(tokenizer or model), **kwargs)

    # ------------------------------------------------------------------ requests

    def encode(self, prompt: PromptInput) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def submit(self, request: SequenceRequest, sink: Sink) -> Handle:
        """Queue a request; events go to `sink` from the stepping thread. Raises ValueError
        if it can never fit (prompt + max_new_tokens over the context), EngineClosed."""
        needed = len(request.prompt_ids) + request.max_new_tokens
        if needed > self.max_context:
            whose = ("the model's context" if self.max_context == self.decoder.max_positions
                     else "the context this engine allows")
            raise ValueError(f"the prompt is {len(request.prompt_ids)} tokens and "
                             f"max_new_tokens is {request.max_new_tokens}: more than {whose} "
                             f"of {self.max_context} tokens")
        seed = request.seed if request.seed is not None else secrets.randbits(62)
        sequence = _Sequence(request, sink, random.Random(seed))
        if request.stop or request.stream:
            sequence.text = StopText(request.stop, request.include_stop)
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine is closed")
            self._pending.append(sequence)
            self._wake.notify()
        return Handle(sequence)

    def run(self, requests: Sequence[SequenceRequest],
            progress: Callable[[int, int], None] | None = None) -> list[SequenceResult]:
        """Generate every request to the end; results in the order of `requests`.
        `progress(tokens, finished)` is called after each step with the tokens it produced and
        the requests it finished."""
        results: list[SequenceResult | None] = [None] * len(requests)
        errors: list[Exception] = []
        done = threading.Event()
        remaining = [len(requests)]

        def collect(index: int) -> Sink:
            def sink(event: EngineEvent) -> None:
                if isinstance(event, Finished):
                    results[index] = event.result
                elif isinstance(event, Errored):
                    errors.append(event.error)
                else:
                    return
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()
            return sink

        if not requests:
            return []
        handles: list[Handle] = []
        try:
            for index, request in enumerate(requests):
                handles.append(self.submit(request, collect(index)))
            if self._thread is not None:
                done.wait()
            else:
                while not done.is_set():
                    before = remaining[0]
                    produced = self.step()
                    if progress is not None:
                        progress(produced, before - remaining[0])
        except BaseException:
            for handle in handles:  # none of this run's requests stays queued
                handle.cancel()
            with self._lock:
                self._pending = deque(s for s in self._pending if not s.cancelled.is_set())
            raise
        if errors:
            raise errors[0]
        return [r for r in results if r is not None]

    # ------------------------------------------------------------------ the serving thread

    def start(self) -> None:
        """Step in a background thread (serving); `close()` stops it."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, daemon=True,
                                            name="generation-engine")
            self._thread.start()

    def close(self) -> None:
        """Stop stepping, fail what is queued or running, drop the model."""
        with self._lock:
            self._closed = True
            self._wake.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)
        with self._step_lock:
            for sequence in [*self._active, *self._pending]:
                sequence.send(Errored(EngineClosed("the engine was closed")))
            self._active, self._pending = [], deque()
            self.cache = self.decoder.new_cache()

    @property
    def busy(self) -> int:
        """Requests running, being admitted or waiting (cancelled ones do not count)."""
        waiting = sum(not s.cancelled.is_set() for s in list(self._pending))
        return len(self._active) + len(self._admitting) + waiting

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._pending and not self._active:
                    self._wake.wait()
                if self._closed:
                    return
            with contextlib.suppress(Exception):  # step() failed its own requests
                self.step()

    # ------------------------------------------------------------------ weights

    def load_state_dict(self, state: Any) -> None:
        """Copy tensors (Hugging Face names) into the model between two steps."""
        import torch

        from training.models import check_weights

        with self._step_lock, torch.no_grad():
            own = self.model.state_dict()
            check_weights(state, {name: tensor.shape for name, tensor in own.items()})
            for name, tensor in state.items():
                own[name].copy_(tensor.to(device=own[name].device, dtype=own[name].dtype))
            self.decoder.refresh()
            self._prefix = None

    # ------------------------------------------------------------------ one step

    def step(self) -> int:
        """Admit what fits, decode one token for every running sequence; returns the number
        of tokens produced."""
        import torch

        with self._step_lock, torch.inference_mode():
            try:
                self._retire()
                produced = self._advance()
                self._retire()
            except Exception as exc:
                # The model failed: the sequences in this step get the error (none is left
                # waiting for an answer that will not come); queued ones are untouched.
                for sequence in [*self._active, *self._admitting]:
                    if not sequence.finish:  # those finished this step have had their event
                        sequence.finish = "error"
                        sequence.send(Errored(exc))
                self._active, self._admitting = [], []
                raise
            self.tokens_generated += produced
            return produced

    def _retire(self) -> None:
        """Finished and cancelled sequences leave; the last slot moves into each hole."""
        for index in range(len(self._active) - 1, -1, -1):
            sequence = self._active[index]
            if sequence.cancelled.is_set() and not sequence.finish:
                sequence.finish = "cancelled"
                sequence.send(Finished(self._result(sequence)))
            if not sequence.finish:
                continue
            last = len(self._active) - 1
            if index != last:
                moved = self._active[last]
                self.cache.move(last, index, moved.cached)
                self._active[index] = moved
            self._active.pop()

    def _take_pending(self) -> list[_Sequence]:
        """The waiting sequences to admit now: FIFO, within the free slots, the prefill budget
        of this step and the KV cache."""
        taken: list[_Sequence] = []
        prompts: set[tuple[int, ...]] = set()
        prefill = 0
        need = max((len(s.request.prompt_ids) + s.request.max_new_tokens for s in self._active),
                   default=0)
        with self._lock:
            # Cancelled requests leave the queue at once, wherever they wait, so they neither
            # hold a place in it nor count as busy.
            dropped = [s for s in self._pending if s.cancelled.is_set()]
            if dropped:
                self._pending = deque(s for s in self._pending if not s.cancelled.is_set())
            while self._pending and len(self._active) + len(taken) < self.max_batch:
                sequence = self._pending[0]
                request = sequence.request
                new_prompt = request.prompt_ids not in prompts
                cost = len(request.prompt_ids) if new_prompt else 0
                wanted = max(need, len(request.prompt_ids) + request.max_new_tokens)
                rows = len(self._active) + len(taken) + 1
                if taken and (prefill + cost > self.prefill_tokens
                              or rows * wanted > self.kv_positions):
                    break
                if not taken and self._active and rows * wanted > self.kv_positions:
                    break  # wait for running sequences to free the cache
                self._pending.popleft()
                taken.append(sequence)
                prompts.add(request.prompt_ids)
                prefill += cost
                need = wanted
        for sequence in dropped:
            sequence.finish = "cancelled"
            sequence.send(Finished(self._result(sequence)))
        return taken

    def _advance(self) -> int:
        """One forward pass: every running sequence decodes a token and the admitted ones
        prefill their prompts and sample their first tokens (a prefill longer than
        PREFILL_CHUNK runs its leading chunks first, alone)."""
        import torch

        from training.decoder import Segment

        taken = self._take_pending()
        self._admitting = taken
        active = self._active
        device = self.decoder.device
        segments: list[Segment] = []
        if active:
            segments.append(Segment(
                torch.tensor([[s.completion[-1]] for s in active], device=device),
                torch.tensor([[s.cached] for s in active], device=device), 0))
        leaders: list[_Sequence] = []
        followers: list[_Sequence] = []
        distinct: list[tuple[int, ...]] = []
        prefix = last = 0
        first = len(active)
        if taken:
            # New slots from `first`: one sequence per distinct prompt (prefilled together, in
            # the order of `distinct`), then the other samples of those prompts (copies of the
            # cache).
            distinct = list(dict.fromkeys(s.request.prompt_ids for s in taken))
            seen: set[tuple[int, ...]] = set()
            for sequence in taken:
                prompt = sequence.request.prompt_ids
                (followers if prompt in seen else leaders).append(sequence)
                seen.add(prompt)
            capacity = max(len(s.request.prompt_ids) + s.request.max_new_tokens
                           for s in [*active, *taken])
            wanted = first + len(taken)
            # Slots grow in doublings, within the batch cap and the KV budget.
            room = max(wanted, self.kv_positions // capacity)
            self.cache.ensure(wanted if wanted <= self.cache.slots else
                              min(self.max_batch, room, max(wanted, 2 * self.cache.slots)),
                              capacity, keep_slots=first, max_positions=self.kv_positions)
            tokens, positions, prefix = self._prefill_inputs(distinct, first)
            last = (tokens.shape[1] - 1) // PREFILL_CHUNK * PREFILL_CHUNK
            for chunk in range(0, last, PREFILL_CHUNK):
                self.decoder.forward(tokens[:, chunk:chunk + PREFILL_CHUNK],
                                     positions[:, chunk:chunk + PREFILL_CHUNK], self.cache, first)
            segments.append(Segment(tokens[:, last:], positions[:, last:], first))
        if not segments:
            return 0  # nothing running and nothing admitted (the queue held cancelled ones)
        hidden = self.decoder.forward_segments(segments, self.cache)
        rows = [hidden[0][:, -1]] if active else []
        if taken:
            prefilled = hidden[-1]
            ends = torch.tensor([len(p) - prefix - 1 - last for p in distinct], device=device)
            last_hidden = prefilled[torch.arange(len(distinct), device=device), ends]
            index_of = {prompt: i for i, prompt in enumerate(distinct)}
            for number, sequence in enumerate(followers):
                prompt = sequence.request.prompt_ids
                self.cache.move(first + index_of[prompt], first + len(leaders) + number,
                                len(prompt))
            rows.append(last_hidden.index_select(0, torch.tensor(
                [index_of[s.request.prompt_ids] for s in [*leaders, *followers]],
                device=device)))
        for sequence in active:
            sequence.cached += 1
        for sequence in [*leaders, *followers]:
            sequence.cached = len(sequence.request.prompt_ids)
        self._active.extend([*leaders, *followers])
        self._admitting = []
        stepped = self._active
        self.peak_batch = max(self.peak_batch, len(stepped))
        if stepped:
            self._sample(stepped, self.decoder.logits(torch.cat(rows) if len(rows) > 1
                                                      else rows[0]))
        return len(stepped)

    def _prefill_inputs(self, prompts: Sequence[Sequence[int]], first: int,
                        max_prefix: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Put the keys/values of the prompts' shared prefix into slots first.. (computed
        once, or reused from an earlier prefill; at most `max_prefix` tokens of it) and return
        what is left to prefill: tokens and positions (len(prompts), longest rest), and the
        prefix length."""
        import torch

        decoder, cache = self.decoder, self.cache
        limit = min(len(p) for p in prompts) - 1  # every prompt keeps >= 1 token to prefill
        if max_prefix is not None:
            limit = min(limit, max_prefix)
        shared = min(common_prefix(prompts), limit)
        reuse = 0
        if self._prefix is not None:
            cached_ids = self._prefix[0]
            reuse = min(common_prefix([cached_ids, *prompts]), limit)
        prefix = 0
        # A prefix of its own (one more forward pass) pays when several prompts share it, or
        # when there is none to reuse yet (the next requests may share it: a system prompt).
        if shared >= MIN_PREFIX and shared > reuse and (len(prompts) > 1 or reuse < MIN_PREFIX):
            # Extend what is reusable to the whole shared prefix, in slot `first`.
            if reuse >= MIN_PREFIX and self._prefix is not None:
                cache.write(first, self._prefix[1][:, :, :reuse], self._prefix[2][:, :, :reuse])
                start = reuse
            else:
                start = 0
            for chunk in range(start, shared, PREFILL_CHUNK):
                end = min(shared, chunk + PREFILL_CHUNK)
                ids = torch.tensor([list(prompts[0][chunk:end])], device=decoder.device)
                positions = torch.arange(chunk, end, device=decoder.device).unsqueeze(0)
                decoder.forward(ids, positions, cache, first)
            keys, values = cache.read(first, shared)
            self._prefix = (tuple(prompts[0][:shared]), keys, values)
            prefix = shared
        elif reuse >= MIN_PREFIX:
            prefix = reuse
        if prefix:
            assert self._prefix is not None
            keys, values = self._prefix[1][:, :, :prefix], self._prefix[2][:, :, :prefix]
            for row in range(len(prompts)):
                cache.write(first + row, keys, values)
        width = max(len(p) for p in prompts) - prefix
        tokens = torch.full((len(prompts), width), self.tokenizer.pad_token_id or 0,
                            dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens[row, :len(prompt) - prefix] = torch.tensor(list(prompt[prefix:]))
        # Padding continues each row's positions: its keys land beyond the row's prompt, where
        # no real query looks (causal mask) and decoding overwrites them.
        positions = prefix + torch.arange(width).unsqueeze(0).expand(len(prompts), width)
        return tokens.to(decoder.device), positions.to(decoder.device), prefix

    def _prefill(self, prompts: Sequence[Sequence[int]], first: int,
                 max_prefix: int | None = None) -> tuple[torch.Tensor, int]:
        """Prefill the prompts into slots first..: the final hidden states of what was not a
        shared prefix, (len(prompts), longest rest, hidden), with the prefix length. Long
        prompts go through in chunks of PREFILL_CHUNK tokens (bounded attention memory)."""
        import torch

        tokens, positions, prefix = self._prefill_inputs(prompts, first, max_prefix)
        hidden = [self.decoder.forward(tokens[:, chunk:chunk + PREFILL_CHUNK],
                                       positions[:, chunk:chunk + PREFILL_CHUNK], self.cache,
                                       first)
                  for chunk in range(0, tokens.shape[1], PREFILL_CHUNK)]
        return torch.cat(hidden, dim=1), prefix

    def completion_logits(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]
                          ) -> list[torch.Tensor]:
        """Teacher-forced logits at the positions that predict each completion's tokens:
        (len(completion), vocab) per (prompt ids, completion ids) pair, in the engine's dtype,
        the pairs' shared prefix computed once. For evaluation (KL along sampled answers);
        runs between steps, in the cache slots after the running sequences."""
        import torch

        out: list[torch.Tensor] = [torch.empty(0)] * len(pairs)
        rows = [i for i, (_, completion) in enumerate(pairs) if completion]
        if not rows:
            return [torch.empty((0, 0)) for _ in pairs]
        # The last completion token predicts nothing that is scored: it is not fed.
        inputs = [[*pairs[i][0], *pairs[i][1][:-1]] for i in rows]
        with self._step_lock, torch.inference_mode():
            first = len(self._active)
            self.cache.ensure(first + len(rows), max(len(x) for x in inputs), keep_slots=first)
            hidden, prefix = self._prefill(inputs, first,
                                           max_prefix=min(len(pairs[i][0]) for i in rows) - 1)
            for row, i in enumerate(rows):
                prompt, completion = pairs[i]
                start = len(prompt) - 1 - prefix
                out[i] = self.decoder.logits(hidden[row, start:start + len(completion)])
        for i, (_, completion) in enumerate(pairs):
            if not completion:
                out[i] = torch.empty((0, out[rows[0]].shape[-1]))
        return out

    def _sample(self, sequences: list[_Sequence], logits: torch.Tensor) -> None:
        import torch

        from training.sampling import sample_tokens

        requests = [s.request for s in sequences]
        temperature = torch.tensor([r.temperature for r in requests])
        top_p = torch.tensor([r.top_p for r in requests])
        uniforms = torch.tensor([s.rng.random() if r.temperature > 0 else 0.0
                                 for s, r in zip(sequences, requests, strict=True)],
                                dtype=torch.float64)
        logits = logits.float().cpu()
        tokens, logprobs = sample_tokens(logits, temperature, top_p, uniforms)
        for row, (sequence, token, logprob) in enumerate(zip(sequences, tokens.tolist(),
                                                              logprobs.tolist(), strict=True)):
            k = sequence.request.top_logprobs
            if k is not None:
                raw = torch.log_softmax(logits[row], dim=-1)
                top: tuple[tuple[int, float], ...] = ()
                if k:
                    values, ids = torch.topk(raw, k)
                    top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
                sequence.alternatives.append(TokenAlternatives(float(raw[token]), top))
            self._accept(sequence, int(token), float(logprob))

    def _accept(self, sequence: _Sequence, token: int, logprob: float) -> None:
        request = sequence.request
        sequence.completion.append(token)
        sequence.logprobs.append(logprob)
        if token in self.eos_ids:
            sequence.finish = "stop"
        elif sequence.text is not None:
            text = self.tokenizer.decode(sequence.completion, skip_special_tokens=True)
            piece = sequence.text.feed(text)
            if piece and request.stream:
                sequence.send(TextDelta(piece))
            if sequence.text.stopped:
                sequence.finish = "stop"
        if not sequence.finish and (len(sequence.completion) >= request.max_new_tokens
                                    or sequence.cached + 1 >= self.max_context):
            sequence.finish = "length"
        if sequence.finish:
            if sequence.text is not None and not sequence.text.stopped and request.stream:
                text = self.tokenizer.decode(sequence.completion, skip_special_tokens=True)
                piece = sequence.text.feed(text, final=True)
                if piece:
                    sequence.send(TextDelta(piece))
            sequence.send(Finished(self._result(sequence)))

    def _result(self, sequence: _Sequence) -> SequenceResult:
        if sequence.text is not None and sequence.text.stopped:
            text = sequence.text.text
        else:
            text = str(self.tokenizer.decode(sequence.completion, skip_special_tokens=True))
        return SequenceResult(
            prompt_ids=list(sequence.request.prompt_ids), completion_ids=list(sequence.completion),
            text=text, logprobs=list(sequence.logprobs), finish_reason=sequence.finish,
            alternatives=(list(sequence.alternatives)
                          if sequence.request.top_logprobs is not None else None))


__all__ = ["EngineClosed", "Errored", "Finished", "GenerationEngine", "Handle", "PromptInput",
           "SequenceRequest", "SequenceResult", "StopText", "TextDelta", "TokenAlternatives",
           "common_prefix", "encode_prompt"]
