"""The policy-serving engines: they generate the deployed policy's answers behind /v1
(the OpenAI-compatible endpoint, app/routes/openai_api.py).

Two engines, one interface (`Engine.submit(request, emit) -> Job`; events are pushed to `emit`
as the text is produced, so streaming and plain calls share one path):

- `HFEngine`: a Hugging Face causal LM in this process (CPU by default). torch and transformers
  are imported when an engine is built, never at import. Requests are served one at a time by
  the engine's own worker thread from a bounded queue: a full queue answers 503 at once instead
  of piling up generations until memory runs out. For throughput, front a vLLM server instead.
- `UpstreamEngine`: proxies to an OpenAI-compatible server (vLLM's `vllm serve`, llama.cpp, ...)
  over HTTP; no torch needed, which is what the torch-free app image uses.

Engines are built per policy version by `make_engine(policy, settings)` and switched by the
DeploymentManager (app/deploy.py).

    engine = make_engine(ServedPolicy(1, "v1", "smollm2-135m-instruct", "smollm2-135m-instruct"),
                         get_settings())
    print(generate_blocking(engine, GenerationRequest(prompt="Say hi."), timeout_s=60).text)
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

# A str is used as is; a list of messages gets the chat template (the same input as rollouts).
from training.rollout import PromptInput

if TYPE_CHECKING:
    from app.settings import Settings

FinishReason = Literal["stop", "length"]


class ServingError(Exception):
    """An error with the HTTP status the endpoint answers with."""

    status_code = 500
    error_type = "server_error"


class InvalidRequest(ServingError):
    status_code = 400
    error_type = "invalid_request_error"


class Busy(ServingError):
    """The engine's queue is full: retry shortly."""

    status_code = 503
    error_type = "overloaded"


class NotServing(ServingError):
    """This engine has been unloaded (a race with a switch): retry."""

    status_code = 503
    error_type = "not_serving"


class NoModel(ServingError):
    """Nothing is served (none deployed yet, serving off, every candidate refused): 404, like
    OpenAI's unknown model, since retrying will not help until a version is deployed."""

    status_code = 404
    error_type = "model_not_found"


class EngineFailed(ServingError):
    """The model or the upstream server failed on this request."""

    status_code = 502
    error_type = "engine_error"


class GenerationTimeout(ServingError):
    status_code = 504
    error_type = "timeout"


@dataclass(frozen=True)
class ServedPolicy:
    """What an engine serves: a detached copy of the PolicyVersion row."""

    id: int
    name: str
    base_model: str
    weights_uri: str


@dataclass(frozen=True)
class GenerationRequest:
    prompt: PromptInput
    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_logprobs: int | None = None
    """None: no log-probabilities; k >= 0: each generated token's log-probability and the k
    most likely tokens at its position (OpenAI's `logprobs: true, top_logprobs: k`)."""


MIN_LOGPROB = -9999.0  # what -inf is sent as (JSON has no infinity; vLLM's server does the same)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its text, its log-probability under the model (before temperature
    or top-p), and the `top` most likely tokens at that position as (text, log-probability)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class Delta:
    """A piece of newly generated text (never part of a stop string)."""

    text: str


@dataclass(frozen=True)
class Done:
    generation: Generation


@dataclass(frozen=True)
class Failed:
    error: ServingError


Event = Delta | Done | Failed
Emit = Callable[[Event], None]


@dataclass
class Job:
    """One submitted request. `cancel()` stops its generation at the next token (a client that
    went away does not keep the engine busy)."""

    request: GenerationRequest
    emit: Emit
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()

    def send(self, event: Event) -> None:
        """Deliver an event; a receiver that has gone away (its event loop closed) must not
        take the engine's worker thread down with it."""
        try:
            self.emit(event)
        except Exception:
            self.cancelled.set()


class Engine(Protocol):
    policy: ServedPolicy

    def submit(self, request: GenerationRequest, emit: Emit) -> Job:
        """Queue `request`; events go to `emit` from another thread. Raises Busy when full."""
        ...

    def close(self) -> None:
        """Release the model (in-flight jobs may be cut short)."""
        ...


def generate_blocking(engine: Engine, request: GenerationRequest, *, timeout_s: float
                      ) -> Generation:
    """Run one request to the end from synchronous code (the smoke test, the CLI).
    GenerationTimeout if it does not finish within `timeout_s` (the job is then cancelled)."""
    events: queue.Queue[Event] = queue.Queue()
    job = engine.submit(request, events.put)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GenerationTimeout(f"no answer within {timeout_s:g} s")
            try:
                event = events.get(timeout=remaining)
            except queue.Empty:
                raise GenerationTimeout(f"no answer within {timeout_s:g} s") from None
            if isinstance(event, Done):
                return event.generation
            if isinstance(event, Failed):
                raise event.error
    finally:
        job.cancel()


class StopText:
    """Incremental text with stop strings: `feed(full_text)` returns the text that is safe to
    emit now. Text that could be the start of a stop string is held back until it is not, and
    the text is cut before the first stop string found (which is then `stopped`)."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.emitted = 0
        self.stopped = False
        self.text = ""

    def feed(self, text: str, *, final: bool = False) -> str:
        if self.stopped:
            return ""
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, final, self.stopped = text[:cut], True, True
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


# ---------------------------------------------------------------------------------------------
# What both engines share


class _EngineBase:
    """The request bookkeeping both engines share: refuse new work once closed, wrap a request
    in a Job, hand it to the engine's own scheduling, and turn its outcome into events."""

    supports_logprobs = False  # whether a request may ask for `top_logprobs`

    def __init__(self, policy: ServedPolicy):
        self.policy = policy
        self._closed = False

    def submit(self, request: GenerationRequest, emit: Emit) -> Job:
        if self._closed:
            raise NotServing(f"the engine of {self.policy.name!r} is closed")
        job = Job(request, emit)
        self._enqueue(job)
        return job

    def _enqueue(self, job: Job) -> None:
        """Schedule `job` (it runs through `_deliver` later); raise Busy when full."""
        raise NotImplementedError

    @staticmethod
    def _deliver(job: Job, produce: Callable[[Job], Generation], failure: str) -> None:
        """Run `produce(job)` and send Done, or Failed with the ServingError it raised. Any
        other exception is the model's or the transport's: EngineFailed (502), prefixed with
        `failure`, and the engine keeps serving."""
        try:
            job.send(Done(produce(job)))
        except ServingError as exc:
            job.send(Failed(exc))
        except Exception as exc:
            job.send(Failed(EngineFailed(f"{failure}: {type(exc).__name__}: {exc}")))


# ---------------------------------------------------------------------------------------------
# Hugging Face engine


class HFEngine(_EngineBase):
    """A causal LM in this process, one request at a time from a bounded queue."""

    supports_logprobs = True

    def __init__(self, policy: ServedPolicy, *, max_queue: int = 32, device: str = "cpu",
                 dtype: str = "float32"):
        import torch

        from training.models import load_policy, load_tokenizer, resolve_model

        super().__init__(policy)
        path = resolve_model(policy.weights_uri)
        self.tokenizer: Any = load_tokenizer(path)
        model: Any = load_policy(path, dtype=getattr(torch, dtype))
        self.model: Any = model.to(device).eval()
        self.device = device
        self.context = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._worker = threading.Thread(target=self._serve, daemon=True,
                                        name=f"hf-engine-{policy.name}")
        self._worker.start()

    def _enqueue(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Busy(f"{self._queue.maxsize} requests are already waiting; retry") from None

    def close(self) -> None:
        self._closed = True
        # The worker fails what is still queued, then stops when it finds the queue empty.
        # Drop the weights now; the worker holds no reference once its job returns.
        self.model = None

    def _serve(self) -> None:
        while True:
            try:
                job = self._queue.get(timeout=0.5)
            except queue.Empty:
                if self._closed:
                    return
                continue
            if self._closed or self.model is None:
                job.send(Failed(NotServing(f"{self.policy.name!r} was unloaded")))
                continue
            if job.cancelled.is_set():
                continue
            self._deliver(job, self._generate, "generation failed")

    def _encode(self, prompt: PromptInput) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest(f"{self.policy.name!r} has no chat template: use "
                                 "/v1/completions with a text prompt")
        ids = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def _generate(self, job: Job) -> Generation:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        request, model, tokenizer = job.request, self.model, self.tokenizer
        assert model is not None
        prompt_ids = self._encode(request.prompt)
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty")
        if len(prompt_ids) + request.max_tokens > self.context:
            raise InvalidRequest(f"the prompt is {len(prompt_ids)} tokens and max_tokens is "
                                 f"{request.max_tokens}: more than the model's context of "
                                 f"{self.context} tokens")
        stop_text = StopText(request.stop)
        generated: list[int] = []
        eos_ids = set(_as_list(model.generation_config.eos_token_id)
                      or _as_list(tokenizer.eos_token_id))

        class Streamer(BaseStreamer):
            # generate() calls put() with the prompt first, then each new token.
            seen_prompt = False

            def put(self, value: Any) -> None:
                if not self.seen_prompt:
                    self.seen_prompt = True
                    return
                generated.extend(int(t) for t in value.reshape(-1).tolist())
                text = tokenizer.decode(generated, skip_special_tokens=True)
                piece = stop_text.feed(text)
                if piece:
                    job.send(Delta(piece))

            def end(self) -> None:
                pass

        class Halt(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                halt = stop_text.stopped or job.cancelled.is_set()
                return torch.full((input_ids.shape[0],), halt, dtype=torch.bool,
                                  device=input_ids.device)

        sampling = request.temperature > 0
        options: dict[str, Any] = {"do_sample": sampling, "max_new_tokens": request.max_tokens}
        if sampling:
            options.update(temperature=request.temperature, top_p=request.top_p, top_k=0)
            if request.seed is not None:
                torch.manual_seed(request.seed)  # one worker thread per engine: no interleaving
        else:
            options.update(temperature=None, top_p=None, top_k=None)
        if request.top_logprobs is not None:
            # The raw logits of each step (before temperature and top-p): OpenAI's and vLLM's
            # logprobs are the model's own distribution.
            options.update(output_logits=True, return_dict_in_generate=True)
        input_ids = torch.tensor([prompt_ids], device=self.device)
        with torch.inference_mode():
            output = model.generate(input_ids=input_ids,
                                    attention_mask=torch.ones_like(input_ids),
                                    streamer=Streamer(), pad_token_id=tokenizer.pad_token_id,
                                    stopping_criteria=StoppingCriteriaList([Halt()]), **options)
        if job.cancelled.is_set():
            raise GenerationTimeout("cancelled")
        rest = stop_text.feed(tokenizer.decode(generated, skip_special_tokens=True), final=True)
        if rest:
            job.send(Delta(rest))
        hit_eos = bool(generated) and generated[-1] in eos_ids
        finish: FinishReason = ("stop" if stop_text.stopped or hit_eos
                                or len(generated) < request.max_tokens else "length")
        logprobs = None
        if request.top_logprobs is not None:
            logprobs = token_logprobs(tokenizer, generated, output.logits, request.top_logprobs,
                                      text=stop_text.text, eos_ids=eos_ids)
        return Generation(text=stop_text.text, prompt_tokens=len(prompt_ids),
                          completion_tokens=len(generated), finish_reason=finish,
                          logprobs=logprobs)


def token_logprobs(tokenizer: Any, generated: Sequence[int], logits: Sequence[Any], k: int, *,
                   text: str, eos_ids: set[int]) -> tuple[TokenLogprob, ...]:
    """Each generated token's log-probability and the `k` likeliest tokens at its position,
    from the per-step logits `generate(output_logits=True)` returns.

    Covers the tokens that spell `text`: an end-of-sequence token, and the tokens after a stop
    string (generated, but not part of the answer), are left out.
    """
    import torch

    count = len(generated)
    while count and generated[count - 1] in eos_ids:
        count -= 1
    if tokenizer.decode(generated[:count], skip_special_tokens=True) != text:
        # A stop string cut the text: the fewest tokens whose text reaches past its end.
        low, high = 0, count
        while low < high:
            middle = (low + high) // 2
            if len(tokenizer.decode(generated[:middle], skip_special_tokens=True)) >= len(text):
                high = middle
            else:
                low = middle + 1
        count = low
    out = []
    for step in range(count):
        logprobs = torch.log_softmax(logits[step][0].float(), dim=-1)
        token = generated[step]
        top: tuple[tuple[str, float], ...] = ()
        if k:
            values, ids = torch.topk(logprobs, k)
            top = tuple((tokenizer.decode([int(i)]), max(float(v), MIN_LOGPROB))
                        for v, i in zip(values.tolist(), ids.tolist(), strict=True))
        out.append(TokenLogprob(tokenizer.decode([token]),
                                max(float(logprobs[token]), MIN_LOGPROB), top))
    return tuple(out)


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]


# ---------------------------------------------------------------------------------------------
# Upstream (OpenAI-compatible server) engine


class UpstreamNotReady(ServingError):
    """The upstream server cannot be reached (refused, DNS, connect timeout, hung up before
    answering) or answers 502/503/504: retry. Never a reason to reject a version."""

    status_code = 503
    error_type = "upstream_not_ready"


class UpstreamEngine(_EngineBase):
    """Proxies to an OpenAI-compatible server. At most `max_concurrency` requests are sent at
    once and `max_queue` more wait; beyond that, Busy."""

    def __init__(self, policy: ServedPolicy, *, base_url: str, model: str,
                 api_key: str | None = None, timeout_s: float = 300.0,
                 max_concurrency: int = 16, max_queue: int = 32):
        import httpx

        super().__init__(policy)
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=base_url.rstrip("/"), headers=headers,
                                    timeout=httpx.Timeout(timeout_s, connect=10.0))
        self._unreachable = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)
        self._slots = threading.BoundedSemaphore(max_concurrency + max_queue)
        self._running = threading.BoundedSemaphore(max_concurrency)

    def _enqueue(self, job: Job) -> None:
        if not self._slots.acquire(blocking=False):
            raise Busy("the upstream server already has the maximum of requests; retry")
        threading.Thread(target=self._run, args=(job,), daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self._client.close()

    def _run(self, job: Job) -> None:
        try:
            with self._running:
                if not job.cancelled.is_set():
                    # A transport error (the upstream is down or cut us off) is EngineFailed.
                    self._deliver(job, self._stream, "upstream server")
        finally:
            self._slots.release()

    def _stream(self, job: Job) -> Generation:
        request = job.request
        chat = not isinstance(request.prompt, str)
        body: dict[str, Any] = {
            "model": self.model, "max_tokens": request.max_tokens,
            "temperature": request.temperature, "top_p": request.top_p, "stream": True,
            "stream_options": {"include_usage": True},
            ("messages" if chat else "prompt"): request.prompt,
        }
        if request.stop:
            body["stop"] = list(request.stop)
        if request.seed is not None:
            body["seed"] = request.seed
        path = "/chat/completions" if chat else "/completions"
        text: list[str] = []
        finish, usage = "length", dict[str, Any]()
        try:  # send(stream=True) returns once the headers are in: this catches no mid-stream cut
            response = self._client.send(self._client.build_request("POST", path, json=body),
                                         stream=True)
        except self._unreachable as exc:
            raise UpstreamNotReady(f"upstream not reachable: {type(exc).__name__}: {exc}") from exc
        try:
            if response.status_code >= 400:
                detail = response.read().decode(errors="replace")[:500]
                error = (InvalidRequest if response.status_code in (400, 422) else UpstreamNotReady
                         if response.status_code in (502, 503, 504) else EngineFailed)
                raise error(f"upstream answered {response.status_code}: {detail}")
            for line in response.iter_lines():
                if job.cancelled.is_set():
                    break
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    raise EngineFailed(f"upstream: {chunk['error']}")
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content") if chat else choice.get(
                        "text")
                    if piece:
                        text.append(piece)
                        job.send(Delta(piece))
                    finish = choice.get("finish_reason") or finish
        finally:
            response.close()
        return Generation(text="".join(text), prompt_tokens=int(usage.get("prompt_tokens", 0)),
                          completion_tokens=int(usage.get("completion_tokens", 0)),
                          finish_reason="stop" if finish == "stop" else "length")


def upstream_model_name(template: str, policy: ServedPolicy) -> str:
    """The model name the upstream server knows this version by (`{name}`, `{id}`,
    `{weights_uri}`, `{base_model}` are filled in)."""
    return template.format(name=policy.name, id=policy.id, weights_uri=policy.weights_uri,
                           base_model=policy.base_model)


def make_engine(policy: ServedPolicy, settings: Settings) -> Engine:
    """The engine for `policy` as the settings say (PREFLOOP_SERVING=hf|upstream)."""
    if settings.serving == "hf":
        return HFEngine(policy, max_queue=settings.serving_max_queue,
                        device=settings.serving_device, dtype=settings.serving_dtype)
    if settings.serving == "upstream":
        assert settings.serving_upstream_url is not None  # checked by Settings
        key = settings.serving_upstream_api_key
        return UpstreamEngine(
            policy, base_url=upstream_model_name(settings.serving_upstream_url, policy),
            model=upstream_model_name(settings.serving_upstream_model, policy),
            api_key=key.get_secret_value() if key is not None else None,
            timeout_s=settings.serving_request_timeout_s,
            max_concurrency=settings.serving_upstream_concurrency,
            max_queue=settings.serving_max_queue)
    raise NoModel("serving is off (PREFLOOP_SERVING=off)")
