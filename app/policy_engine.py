"""The policy-serving engines' interface: what /v1 (app/routes/openai_api.py) and the
deployment manager (app/deploy.py) see of the engine that generates the deployed policy's answers.

`Engine.submit(request, emit) -> Job`: events are pushed to `emit` as the text is produced
(Delta, then Done or Failed), so streaming and plain calls share one path; `Job.cancel()` takes
the request out of the engine at its next step (a client that went away, a timeout).

Two engines, built per policy version by `make_engine(policy, settings)` (app/engines.py):

- `LocalEngine` (app/local_engine.py): the in-process generation engine of training/generation.py
  (continuous batching: concurrent requests share each decode step); needs torch.
- `UpstreamEngine` (app/upstream_engine.py): proxies to an OpenAI-compatible server (vLLM's
  `vllm serve`, llama.cpp, ...) over HTTP; no torch needed.

    engine = make_engine(ServedPolicy(1, "v1", "smollm2-135m-instruct", "smollm2-135m-instruct"),
                         get_settings())
    print(generate_blocking(engine, GenerationRequest(prompt="Say hi."), timeout_s=60).text)
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

# A str is used as is; a list of messages gets the chat template (the same input as rollouts).
from training.sequences import PromptInput

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


class TooManyRequests(ServingError):
    """This API token already has its maximum of generations running: retry when one ends."""

    status_code = 429
    error_type = "rate_limit_exceeded"


class UpstreamNotReady(ServingError):
    """The upstream server cannot be reached (refused, DNS, connect timeout, hung up before
    answering) or answers 502/503/504: retry. Never a reason to reject a version."""

    status_code = 503
    error_type = "upstream_not_ready"


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
    on_cancel: Callable[[], None] | None = None
    """Set by an engine that can stop the work itself (the local engine's request handle)."""

    def cancel(self) -> None:
        self.cancelled.set()
        if self.on_cancel is not None:
            self.on_cancel()

    def send(self, event: Event) -> None:
        """Deliver an event; a receiver that has gone away (its event loop closed) must not
        take the engine's worker thread down with it."""
        try:
            self.emit(event)
        except Exception:
            self.cancel()


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


# ---------------------------------------------------------------------------------------------
# What both engines share


class EngineBase:
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
        try:
            self._enqueue(job)
        except ServingError:
            raise
        except Exception as exc:  # the engine's fault, never the caller's: 502, not 500
            raise EngineFailed(f"could not queue the request: {type(exc).__name__}: {exc}"
                               ) from exc
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
