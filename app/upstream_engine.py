"""The upstream serving engine: /v1 proxied to an OpenAI-compatible server (vLLM's
`vllm serve`, llama.cpp's server, another prefloop). No torch needed, which is what the
torch-free app image uses.

    engine = UpstreamEngine(ServedPolicy(1, "v1", "base", "/models/v1"),
                            base_url="http://vllm:8000/v1", model="/models/v1")
    print(generate_blocking(engine, GenerationRequest(prompt="Say hi."), timeout_s=60).text)
"""

from __future__ import annotations

import json
import threading
from typing import Any

from app.policy_engine import (
    Busy,
    Delta,
    EngineBase,
    EngineFailed,
    Generation,
    InvalidRequest,
    Job,
    ServedPolicy,
    UpstreamNotReady,
)


class UpstreamEngine(EngineBase):
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
