"""One chat-completion attempt against an OpenAI-compatible endpoint, through the `openai` client.

Works with OpenAI, vLLM's server, llama.cpp's server and prefloop's own policy endpoint. This
module makes exactly one attempt per call and classifies what went wrong; retries, backoff, the
rate limiter and the budget live in feedback/batch.py. Retries inside the client are off
(`max_retries=0`) so every attempt passes the rate limiter, and each attempt is bounded by
`asyncio.wait_for` as well as the client timeout, because the client's own timeout is not always
honoured (openai/openai-python#2599).

    endpoint = ChatEndpoint(base_url="http://127.0.0.1:8011/v1", model="smollm2", timeout_s=30)
    result = await endpoint.complete(messages, schema)
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SHARD_CONNECTIONS = 8


@dataclass(frozen=True)
class CallResult:
    text: str | None
    tokens: tuple[tuple[str, float], ...] | None  # (token, logprob), when the endpoint gives them
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    # Per generated position, the endpoint's `top_logprobs` as (token, logprob), when asked for.
    top: tuple[tuple[tuple[str, float], ...], ...] | None = None


class CallFailed(Exception):
    """An attempt failed. `retryable` says whether another attempt may succeed."""

    def __init__(self, message: str, *, kind: str, retryable: bool,
                 retry_after: float | None = None, status: int | None = None):
        super().__init__(message)
        self.kind = kind  # rate_limited | server_error | timeout | connection | rejected
        self.retryable = retryable
        self.retry_after = retry_after
        self.status = status


class EndpointUnusable(Exception):
    """The endpoint refuses every call (bad key, unknown model, wrong URL): stop the run."""


def _error_text(exc: Exception) -> str:
    return f"{exc} {getattr(exc, 'body', '')}".lower()


def retry_after_seconds(headers: Mapping[str, str] | None, *, now: float | None = None
                        ) -> float | None:
    """Seconds to wait from `retry-after-ms` (OpenAI's) or `Retry-After` (seconds or a date)."""
    if not headers:
        return None
    lowered = {k.lower(): v for k, v in headers.items()}
    if "retry-after-ms" in lowered:
        try:
            return max(0.0, float(lowered["retry-after-ms"]) / 1000)
        except ValueError:
            pass
    value = lowered.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def backoff_delay(attempt: int, *, base_s: float, max_s: float, retry_after: float | None,
                  rng: random.Random) -> float:
    """Wait before retry number `attempt` (1-based).

    The server's Retry-After wins (capped at `max_s`), plus up to 10% jitter so that clients
    told the same time do not return together. Otherwise exponential backoff with "equal
    jitter": half of base * 2^(attempt-1) fixed, half random, so waits grow but never align.
    """
    if retry_after is not None:
        wait = min(retry_after, max_s)
        return wait + rng.uniform(0, 0.1 * wait)
    ceiling = min(max_s, base_s * 2 ** (attempt - 1))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


class ChatEndpoint:
    """An OpenAI-compatible chat endpoint with structured-output and logprob fallbacks."""

    def __init__(self, *, model: str, base_url: str | None = None, api_key: str | None = None,
                 timeout_s: float = 60.0, structured_output: str = "auto",
                 logprobs: bool = True, temperature: float = 0.0, max_tokens: int = 512,
                 max_connections: int = 64, top_logprobs: int = 0):
        import importlib.util

        import openai

        # openai >= 3 is built on httpx2, older releases on httpx: use the one it uses.
        httpx_module = importlib.import_module(
            "httpx2" if importlib.util.find_spec("httpx2") else "httpx")

        self._openai = openai
        self._raw_response_type = httpx_module.Response
        self.model = model
        self.timeout_s = timeout_s
        self.structured_output = structured_output
        # Structured-output dialects to try, best first: OpenAI's (also vLLM's) json_schema,
        # then llama-cpp-python's json_object + schema. "auto" steps down when the endpoint
        # refuses one; when none is accepted the strict parser alone decides.
        self.schema_modes: list[str] = {
            "auto": ["json_schema", "json_object"], "json_schema": ["json_schema"],
            "json_object": ["json_object"], "off": []}[structured_output]
        self.use_logprobs = logprobs
        # Alternatives per position; > 0 means the verdict is read from them (log-prob mode),
        # so an endpoint that refuses logprobs cannot serve this judge at all.
        self.top_logprobs = top_logprobs
        self._dropped: str | None = None
        self.temperature = temperature
        self.max_tokens = max_tokens
        # Several clients of at most SHARD_CONNECTIONS connections each: the HTTP pool checks
        # every idle connection on each request, so one pool of 64 costs ~8x the CPU of 8
        # pools of 8 (measured with benchmarks/judge_throughput.py). Calls go to the least
        # busy client, so no client ever has more calls than connections.
        n_clients = max(1, -(-max_connections // SHARD_CONNECTIONS))
        per_client = -(-max_connections // n_clients)
        # One TLS context for all clients: building one loads the CA bundle (~0.1 s each).
        tls = ssl.create_default_context()
        self._clients = [
            openai.AsyncOpenAI(
                base_url=base_url or os.environ.get("OPENAI_BASE_URL") or None,
                api_key=api_key or os.environ.get("OPENAI_API_KEY") or "not-needed",
                max_retries=0,
                timeout=httpx_module.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
                http_client=openai.DefaultAsyncHttpxClient(verify=tls, limits=httpx_module.Limits(
                    max_connections=per_client, max_keepalive_connections=per_client)),
            ) for _ in range(n_clients)]
        self._busy = [0] * n_clients

    @property
    def schema_mode(self) -> str | None:
        return self.schema_modes[0] if self.schema_modes else None

    async def aclose(self) -> None:
        for client in self._clients:
            await client.close()

    def _refused_format(self, exc: Exception) -> bool:
        """If the error is about the structured-output format, drop the current dialect."""
        if self.structured_output != "auto" or self.schema_mode is None:
            return False
        text = _error_text(exc)
        if not any(word in text for word in
                                 ("response_format", "json_schema", "json_object", "grammar")):
            return False
        self._dropped = self.schema_modes.pop(0)
        return True

    def _request(self, messages: list[dict[str, str]], schema: dict[str, Any]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"model": self.model, "messages": messages,
                                  "temperature": self.temperature, "max_tokens": self.max_tokens}
        mode = self.schema_mode
        if mode == "json_schema":
            kwargs["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "verdict", "schema": schema, "strict": True}}
        elif mode == "json_object":
            kwargs["response_format"] = {"type": "json_object", "schema": schema}
        if self.use_logprobs:
            kwargs["logprobs"] = True
            if self.top_logprobs:
                kwargs["top_logprobs"] = self.top_logprobs
        return kwargs

    async def complete(self, messages: list[dict[str, str]], schema: dict[str, Any]
                       ) -> CallResult:
        """One attempt. Raises CallFailed (classified) or EndpointUnusable."""
        openai = self._openai
        kwargs = self._request(messages, schema)
        shard = min(range(len(self._clients)), key=self._busy.__getitem__)
        self._busy[shard] += 1
        try:
            # `post` with a raw body and a raw response is the client's documented way to call
            # an endpoint directly: the same transport, auth and typed errors as
            # `chat.completions.create`, without the per-call TypedDict transform of the
            # request and the pydantic model of the response, which together were most of the
            # client's CPU per call (benchmarks/judge_throughput.py at concurrency 64).
            raw = await asyncio.wait_for(self._clients[shard].post(
                "/chat/completions", body=kwargs, cast_to=self._raw_response_type),
                self.timeout_s)
            body = raw.json()
        except (TimeoutError, openai.APITimeoutError):
            raise CallFailed("timed out", kind="timeout", retryable=True) from None
        except openai.RateLimitError as exc:
            raise CallFailed("429 rate limited", kind="rate_limited", retryable=True, status=429,
                             retry_after=retry_after_seconds(exc.response.headers)) from None
        except openai.InternalServerError as exc:
            # llama-cpp-python answers an unknown response_format with a 500 that names it.
            if self._refused_format(exc):
                raise CallFailed(f"{exc.status_code}: {self._dropped} refused; trying the next "
                                 "structured-output dialect", kind="fallback", retryable=True,
                                 retry_after=0.0, status=exc.status_code) from None
            raise CallFailed(f"{exc.status_code} server error", kind="server_error",
                             retryable=True, status=exc.status_code,
                             retry_after=retry_after_seconds(exc.response.headers)) from None
        except (openai.AuthenticationError, openai.PermissionDeniedError,
                openai.NotFoundError) as exc:
            raise EndpointUnusable(f"{exc.status_code}: {exc.message}") from None
        except openai.APIStatusError as exc:
            status = exc.status_code
            if status in (408, 409):
                raise CallFailed(f"{status}", kind="server_error", retryable=True,
                                 status=status) from None
            # A feature this endpoint lacks: drop it and let the caller retry at once. Only
            # when the error names it, so one bad request (say, a prompt over the context
            # length) does not switch structured output or logprobs off for the whole run.
            if self._refused_format(exc):
                raise CallFailed(f"{status}: {self._dropped} refused; trying the next "
                                 "structured-output dialect", kind="fallback", retryable=True,
                                 retry_after=0.0, status=status) from None
            if self.top_logprobs and "logprob" in _error_text(exc):
                raise EndpointUnusable(f"{status}: this endpoint gives no token logprobs, which "
                                       "a verdict = \"logprobs\" judge reads; use verdict = "
                                       f"\"generate\" ({exc.message})"[:400]) from None
            if self.use_logprobs and "logprob" in _error_text(exc):
                self.use_logprobs = False
                raise CallFailed(f"{status}: logprobs refused; retrying without",
                                 kind="fallback", retryable=True, retry_after=0.0,
                                 status=status) from None
            raise CallFailed(f"{status}: {exc.message}"[:300], kind="rejected", retryable=False,
                             status=status) from None
        except openai.APIConnectionError as exc:
            raise CallFailed(f"connection: {exc}"[:300], kind="connection",
                             retryable=True) from None
        except (openai.APIResponseValidationError, ValueError) as exc:
            raise CallFailed(f"bad response body: {exc}"[:300], kind="server_error",
                             retryable=True) from None
        finally:
            self._busy[shard] -= 1
        return parse_completion(body)


def parse_completion(body: Any) -> CallResult:
    """The parts of a chat.completion response body the judge uses; a body that does not have
    the chat.completion shape is a server error (retried), never an empty verdict."""
    if not isinstance(body, dict):
        raise CallFailed("response is not a JSON object", kind="server_error", retryable=True)
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise CallFailed("response has no choices", kind="server_error", retryable=True)
    choice: dict[str, Any] = choices[0]
    raw_message = choice.get("message")
    message: dict[str, Any] = raw_message if isinstance(raw_message, dict) else {}
    text = message.get("content")
    if text is not None and not isinstance(text, str):
        raise CallFailed("message content is not text", kind="server_error", retryable=True)
    tokens = top = None
    logprobs = choice.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if isinstance(content, list) and content:
        try:
            tokens = tuple((str(t["token"]), float(t["logprob"])) for t in content)
        except (KeyError, TypeError, ValueError):
            tokens = None  # unusable logprobs: no confidence, the verdict still counts
        try:
            top = tuple(tuple((str(a["token"]), float(a["logprob"]))
                              for a in (t.get("top_logprobs") or ())) for t in content)
        except (AttributeError, KeyError, TypeError, ValueError):
            top = None  # unusable alternatives: a log-prob verdict reads none
    raw_usage = body.get("usage")
    usage: dict[str, Any] = raw_usage if isinstance(raw_usage, dict) else {}
    return CallResult(
        text=text, tokens=tokens,
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        finish_reason=choice.get("finish_reason"), top=top,
    )
