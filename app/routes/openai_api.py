"""The OpenAI-compatible endpoint under /v1: the deployed policy version, for annotators' tasks,
judges and external users, through the standard `openai` client.

`model` is a PolicyVersion name: the deployed one, the warm previous one, or the alias
"deployed". Authentication is the app's bearer token (the client's `api_key`). Bad bodies get
400 with a message (OpenAI's `{"error": {...}}` shape, plus the app's `detail`), never 500;
a full queue gets 503, a stalled generation 504, and 404 when no version is served (none
deployed yet, serving off, or the deployed one was refused).

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=TOKEN)
    client.chat.completions.create(model="deployed", messages=[{"role": "user", "content": "Hi"}])
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from app.auth import AdminUser, CurrentUser, User
from app.deploy import DEPLOYED_ALIAS, DeploymentManager
from app.errors import TOO_DEEP, openai_error, unencodable
from app.policy_engine import (
    Delta,
    Done,
    Event,
    Failed,
    Generation,
    GenerationRequest,
    GenerationTimeout,
    ServingError,
    TooManyRequests,
)
from app.settings import Settings
from training.rollout import PromptInput

router = APIRouter(prefix="/v1", tags=["openai"])

MAX_STOP = 4
MAX_N = 8
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
DISCONNECT_POLL_S = 0.2  # how often a waiting non-streaming request checks its client
SEED_MAX = 2**63 - 1
# Parameters of OpenAI's API this server does not implement. They are refused with a 400 that
# names them, unless set to the value that means "off" (what this server does anyway); any other
# parameter it does not know is refused too, so nothing a client sends is silently ignored.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"),
    "function_call": (None, "none"), "parallel_tool_calls": (None,), "logit_bias": (None, {}),
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False),
    "suffix": (None, ""), "best_of": (None, 1), "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0), "audio": (None,), "modalities": (None, ["text"]),
    "response_format": (None, {"type": "text"}),
}
STREAM_OPTIONS = frozenset({"include_usage"})


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=200)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP or any(not s or len(s) > 200 for s in stops):
            raise ValueError(f"stop takes up to {MAX_STOP} non-empty strings of at most 200 "
                             "characters")
        return value


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class ChatCompletionBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionBody(_Body):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("give one prompt (a string); batches of prompts are not supported")
        return value


def _error(status: int, message: str, error_type: str = "invalid_request_error",
           headers: dict[str, str] | None = None, param: str | None = None) -> JSONResponse:
    return openai_error(status, message, error_type, param=param, headers=headers)


def _serving_error(exc: ServingError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status_code in (429, 503) else None
    return _error(exc.status_code, str(exc), exc.error_type, headers)


def _manager(request: Request) -> DeploymentManager | None:
    manager: DeploymentManager | None = getattr(request.app.state, "deployments", None)
    return manager


async def _parse(request: Request, schema: type[_Body]) -> _Body | JSONResponse:
    try:
        raw = json.loads(await request.body())
    except RecursionError:
        return _error(400, TOO_DEEP)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _error(400, "the body must be a JSON object")
    if not isinstance(raw, dict):
        return _error(400, "the body must be a JSON object")
    bad = unencodable(raw)
    if bad is not None:
        # A lone surrogate ("\ud800") cannot be tokenized or sent upstream; NaN is not JSON.
        return _error(400, f"{bad}: not valid text (a lone UTF-16 surrogate) or not a finite "
                      "number", param=bad)
    try:
        body = schema.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        where = [".".join(str(p) for p in e["loc"]) or "body" for e in errors[:5]]
        problems = "; ".join(f"{w}: {e['msg']}" for w, e in zip(where, errors, strict=False))
        return _error(400, f"invalid request: {problems}", param=where[0] if where else None)
    for name, value in (body.model_extra or {}).items():
        if value not in NEUTRAL.get(name, ()):
            why = ("is not supported by this server" if name in NEUTRAL
                   else "is not a parameter this server implements")
            return _error(400, f"{name!r} {why}; remove it", param=name)
    unknown = sorted(set(body.stream_options or {}) - STREAM_OPTIONS)
    if unknown:
        return _error(400, f"stream_options {unknown[0]!r} is not supported by this server",
                      param=f"stream_options.{unknown[0]}")
    if body.stream_options is not None and not body.stream:
        return _error(400, "stream_options needs stream: true", param="stream_options")
    if body.stream and (body.n or 1) > 1:
        return _error(400, "stream with n > 1 is not supported", param="n")
    if isinstance(body, ChatCompletionBody):
        if body.top_logprobs is not None and not body.logprobs:
            return _error(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if body.logprobs and body.stream:
            return _error(400, "logprobs are returned by non-streaming requests only on this "
                          "server; send stream: false", param="logprobs")
    return body


def _wanted_logprobs(body: _Body) -> int | None:
    """None, or how many top alternatives each token's log-probability comes with."""
    if isinstance(body, ChatCompletionBody) and body.logprobs:
        return body.top_logprobs or 0
    return None


def _logprobs_json(generation: Generation) -> dict[str, Any] | None:
    """OpenAI's chat `logprobs` object: one entry per generated token."""
    if generation.logprobs is None:
        return None

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**entry(t.token, t.logprob),
                         "top_logprobs": [entry(text, lp) for text, lp in t.top]}
                        for t in generation.logprobs], "refusal": None}


def _generation_request(body: _Body, prompt: PromptInput, settings: Settings,
                        max_tokens: int | None) -> GenerationRequest | JSONResponse:
    limit = settings.serving_max_tokens
    max_tokens = max_tokens or settings.serving_default_max_tokens
    if max_tokens > limit:
        return _error(400, f"max_tokens is {max_tokens}; this server allows at most {limit}")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return GenerationRequest(prompt=prompt, max_tokens=max_tokens,
                             temperature=1.0 if body.temperature is None else body.temperature,
                             top_p=1.0 if body.top_p is None else body.top_p, stop=stop,
                             seed=body.seed, top_logprobs=_wanted_logprobs(body))


async def _events(manager: DeploymentManager, engine: Any, request: GenerationRequest
                  ) -> AsyncGenerator[Event]:
    """The events of one generation, ending with Done or Failed; the job is cancelled if the
    consumer stops early (a client that disconnected, a timeout)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    job = engine.submit(request, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
    timeout = manager.settings.serving_request_timeout_s
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout)
            except TimeoutError:
                yield Failed(GenerationTimeout(f"no output for {timeout:g} s"))
                return
            yield event
            if not isinstance(event, Delta):
                return
    finally:
        job.cancel()


async def _generate(manager: DeploymentManager, engine: Any, request: GenerationRequest
                    ) -> Generation:
    async for event in _events(manager, engine, request):
        if isinstance(event, Done):
            return event.generation
        if isinstance(event, Failed):
            raise event.error
    raise GenerationTimeout("the generation ended without a result")


async def _unless_disconnected(http: Request, work: Awaitable[Any]) -> Any:
    """Await `work`, cancelling it (and so its engine jobs) if the client disconnects first:
    an abandoned request must not keep generating. (Streams need no watch: Starlette cancels a
    streaming response whose client went away.)"""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await http.is_disconnected():
                raise ClientGone
    finally:  # gone, or this handler cancelled: the work stops with it
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _all_or_none(work: list[Awaitable[Generation]]) -> list[Generation]:
    """The n generations of one request, together; the first failure cancels the others
    (their engine jobs stop) and is raised."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _StreamThenRelease(StreamingResponse):
    """A stream that calls `on_close` when the response ends however it ends: sent, client
    gone, or never started (a server may cancel before the body is iterated)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None],
                 **kwargs: Any):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


class ConcurrencyLimit:
    """At most `limit` generations at once per API token (per account for a browser
    session): one client cannot take every slot of the engine."""

    def __init__(self, limit: int):
        self.limit = limit
        self.running: dict[str, int] = {}

    def acquire(self, key: str, count: int = 1) -> Callable[[], None]:
        """Hold `count` of `key`'s generations (TooManyRequests if that is over the limit);
        returns the release function, which may be called more than once."""
        # Only the event loop's thread calls this and the release: no lock needed.
        running = self.running.get(key, 0)
        if running + count > self.limit:
            raise TooManyRequests(f"this token already runs {running} of its {self.limit} "
                                  "concurrent generations; retry when one ends")
        self.running[key] = running + count
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.running[key] -= count
                if not self.running[key]:
                    del self.running[key]

        return release


def _limit(request: Request) -> ConcurrencyLimit:
    limit: ConcurrencyLimit | None = getattr(request.app.state, "generation_limit", None)
    if limit is None:
        limit = ConcurrencyLimit(request.app.state.settings.serving_max_concurrent_per_token)
        request.app.state.generation_limit = limit
    return limit


def _limit_key(user: User) -> str:
    return f"token:{user.token_id}" if user.token_id is not None else f"account:{user.id}"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _chat_prompt(messages: list[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": "system" if m.role == "developer" else m.role,
             "content": m.content if isinstance(m.content, str)
             else "".join(part.text for part in m.content)} for m in messages]


async def _complete(request: Request, user: User, body: _Body, prompt: PromptInput,
                    max_tokens: int | None, chat: bool) -> Any:
    manager = _manager(request)
    if manager is None:
        return _error(404, "serving is off (PREFLOOP_SERVING=off)", "model_not_found")
    gen = _generation_request(body, prompt, request.app.state.settings, max_tokens)
    if isinstance(gen, JSONResponse):
        return gen
    limit = _limit(request)
    count = 1 if body.stream else body.n or 1
    if count > limit.limit:
        return _error(400, f"n = {count} is more than the {limit.limit} generations one token "
                      "may run at once on this server", param="n")
    try:
        release = limit.acquire(_limit_key(user), count)
    except TooManyRequests as exc:
        return _serving_error(exc)
    try:
        return await _complete_held(request, manager, body, gen, chat, release)
    except BaseException:
        release()
        raise


async def _complete_held(request: Request, manager: DeploymentManager, body: _Body,
                         gen: GenerationRequest, chat: bool, release: Callable[[], None]
                         ) -> Any:
    """`_complete` once the token's concurrency is held; `release` when the answer (or the
    stream) ends."""
    try:
        slot = manager.acquire(body.model)
    except ServingError as exc:
        release()
        return _serving_error(exc)
    released = False

    def done() -> None:
        """Give back the version's slot and the token's concurrency, once."""
        nonlocal released
        if not released:
            released = True
            slot.release()
            release()

    policy = slot.policy
    if gen.top_logprobs is not None and not getattr(slot.engine, "supports_logprobs", False):
        done()
        return _error(400, f"logprobs are not available from the backend serving "
                      f"{policy.name!r} (PREFLOOP_SERVING=upstream); ask without them",
                      param="logprobs")
    completion_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    headers = {"X-Prefloop-Policy": f"{policy.name}", "X-Prefloop-Policy-Id": str(policy.id)}
    base = {"id": completion_id, "created": created, "model": policy.name,
            "system_fingerprint": f"prefloop-policy-{policy.id}"}
    if not body.stream:
        try:
            # The n answers generate together (they share the prompt's prefill).
            results = await _unless_disconnected(request, _all_or_none([
                _generate(manager, slot.engine, dataclasses.replace(
                    gen, seed=None if gen.seed is None else gen.seed + i))
                for i in range(body.n or 1)]))
        except ServingError as exc:
            return _serving_error(exc)
        except ClientGone:
            return _error(499, "the client closed the connection", "client_closed")
        finally:
            done()
        choices = [({"index": i, "message": {"role": "assistant", "content": r.text},
                     "finish_reason": r.finish_reason, "logprobs": _logprobs_json(r)} if chat else
                    {"index": i, "text": r.text, "finish_reason": r.finish_reason,
                     "logprobs": None}) for i, r in enumerate(results)]
        usage = _usage(results[0].prompt_tokens, sum(r.completion_tokens for r in results))
        return JSONResponse({**base, "object": "chat.completion" if chat else "text_completion",
                             "choices": choices, "usage": usage}, headers=headers)

    # Streaming: wait for the first event so that a refusal (bad prompt, full queue) is still
    # an HTTP error, then send OpenAI's chunks as server-sent events.
    try:
        events = _events(manager, slot.engine, gen)
        first = await events.__anext__()
    except ServingError as exc:
        done()
        return _serving_error(exc)
    except BaseException:
        done()
        raise
    if isinstance(first, Failed):
        done()
        return _serving_error(first.error)
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, *, role: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                {"content": text} if text is not None else {})
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish,
                                      "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish,
                      "logprobs": None}
        payload = {**base, "object": kind, "choices": [choice]}
        if include_usage:
            payload["usage"] = None
        return f"data: {json.dumps(payload)}\n\n"

    async def stream() -> AsyncIterator[str]:
        try:
            if chat:
                yield chunk(None, None, role=True)
            event: Event | None = first
            while event is not None:
                if isinstance(event, Delta):
                    yield chunk(event.text, None)
                elif isinstance(event, Done):
                    result = event.generation
                    yield chunk(None if chat else "", result.finish_reason)
                    if include_usage:
                        yield "data: " + json.dumps({
                            **base, "object": kind, "choices": [],
                            "usage": _usage(result.prompt_tokens, result.completion_tokens)
                        }) + "\n\n"
                    break
                else:
                    assert isinstance(event, Failed)
                    error = event.error
                    yield "data: " + json.dumps({"error": {
                        "message": str(error), "type": error.error_type, "param": None,
                        "code": None}}) + "\n\n"
                    break
                event = await anext(events, None)
            yield "data: [DONE]\n\n"
        finally:
            await events.aclose()
            done()

    return _StreamThenRelease(stream(), done, media_type="text/event-stream",
                              headers={**headers, "Cache-Control": "no-cache"})


@router.get("/models")
def list_models(request: Request, _user: CurrentUser) -> dict[str, Any]:
    """The served policy versions: the deployed one first, then the warm previous one."""
    manager = _manager(request)
    models = manager.models() if manager is not None else []
    return {"object": "list", "data": [_model_card(m, i) for i, m in enumerate(models)]}


@router.get("/models/{model}")
def get_model(request: Request, _user: CurrentUser,
              model: Annotated[str, Path(max_length=200)]) -> Any:
    """One served policy version by name ("deployed" names the current one)."""
    manager = _manager(request)
    models = manager.models() if manager is not None else []
    for i, served in enumerate(models):
        if model == served.name or (model == DEPLOYED_ALIAS and i == 0):
            return _model_card(served, i)
    return _error(404, f"model {model!r} is not served here", "not_found")


def _model_card(policy: Any, index: int) -> dict[str, Any]:
    return {"id": policy.name, "object": "model", "created": 0, "owned_by": "prefloop",
            "policy_id": policy.id, "base_model": policy.base_model,
            "status": "deployed" if index == 0 else "previous"}


@router.post("/chat/completions", openapi_extra={"requestBody": {"required": True, "content": {
    "application/json": {"schema": ChatCompletionBody.model_json_schema()}}}})
async def chat_completions(request: Request, user: CurrentUser) -> Any:
    """OpenAI's chat completions (`stream: true` for server-sent events)."""
    body = await _parse(request, ChatCompletionBody)
    if isinstance(body, JSONResponse):
        return body
    assert isinstance(body, ChatCompletionBody)
    return await _complete(request, user, body, _chat_prompt(body.messages),
                           body.max_completion_tokens or body.max_tokens, chat=True)


@router.post("/completions", openapi_extra={"requestBody": {"required": True, "content": {
    "application/json": {"schema": CompletionBody.model_json_schema()}}}})
async def completions(request: Request, user: CurrentUser) -> Any:
    """OpenAI's (legacy) text completions: the prompt is used as is, no chat template."""
    body = await _parse(request, CompletionBody)
    if isinstance(body, JSONResponse):
        return body
    assert isinstance(body, CompletionBody)
    prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    if not prompt:
        return _error(400, "the prompt is empty")
    return await _complete(request, user, body, prompt, body.max_tokens, chat=False)


@router.get("/serving")
def serving_status(request: Request, _admin: AdminUser) -> dict[str, Any]:
    """What serves (admin): backend, current and warm previous version, the last switch and
    the versions refused lately with why."""
    manager = _manager(request)
    if manager is None:
        return {"backend": "off", "state": "idle", "current": None, "previous": None,
                "last_switch": None, "refusals": [], "waiting": None}
    status = manager.status
    waiting = status.waiting
    return {
        "backend": status.backend, "state": status.state,
        # A deployed version whose upstream is not answering yet (cold start): retried, never
        # refused for it.
        "waiting": None if waiting is None else dataclasses.asdict(waiting),
        "current": _policy(status.current), "previous": _policy(status.previous),
        "last_switch": None if status.last_switch is None else {
            k: getattr(status.last_switch, k) for k in (
                "from_name", "to_name", "load_s", "smoke_s", "total_s", "warm")},
        "refusals": [{"policy_id": r.policy_id, "name": r.name, "reason": r.reason,
                      "at": r.at} for r in status.refusals],
    }


def _policy(policy: Any) -> dict[str, Any] | None:
    if policy is None:
        return None
    return {"id": policy.id, "name": policy.name, "base_model": policy.base_model,
            "weights_uri": policy.weights_uri}

