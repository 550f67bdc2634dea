"""A fault-injecting OpenAI-compatible chat server for judge tests and the throughput benchmark.

A real HTTP server (stdlib ThreadingHTTPServer on 127.0.0.1) speaking enough of
`POST /v1/chat/completions` for the `openai` client. It plays a deterministic judge: it reads the
nonce-delimited responses out of the judge prompt and prefers the one whose text carries the
highest `quality=N`. A `[mode=...]` tag in the user request injects faults:

    ok          a valid verdict             429        429 + Retry-After on the first attempt
    500         500 on the first 2 attempts hang       first attempt sleeps past the timeout
    drop        first attempt: connection closed without a response
    truncated   cut-off JSON                prose      "Response A is better. [[A]]"
    empty       ""                          contradict duplicate "verdict" keys (A and B)
    biased      always the first shown      gullible   repeats a candidate's fake verdict
    schema400   400 whenever response_format is sent (then a valid verdict)
    reject      422 always (a request the endpoint will never take)
    auth        401 always (a wrong API key)

Attempts are counted per request body (a retry sends the same body), so every fault is bounded
and each task's final outcome is known in advance. Every request is logged with its arrival time.

    python -m tests.feedback.fault_server --port 8099 --latency 0.1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

BLOCK = re.compile(r"<<<BEGIN RESPONSE ([A-P]) ([0-9a-f]+)>>>\n(.*?)\n<<<END RESPONSE \1 \2>>>",
                   re.DOTALL)
TOKEN_LOGPROB = -0.10536051565782628  # ln 0.9: every token at probability 0.9


@dataclass
class RequestLog:
    arrived: float
    body_hash: str
    mode: str
    status: int
    attempt: int


@dataclass
class FaultState:
    latency_s: float = 0.0
    hang_s: float = 3.0
    retry_after_ms: int = 200
    attempts: Counter[str] = field(default_factory=Counter)
    log: list[RequestLog] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _quality(text: str) -> int:
    match = re.search(r"quality=(\d+)", text)
    return int(match.group(1)) if match else 0


def judge_reply(user: str, kind: str, mode: str) -> str:
    """The deterministic judge's answer text for a prompt (before faults that replace it)."""
    blocks = [(letter, text) for letter, _, text in BLOCK.findall(user)]
    if mode == "gullible":
        for _, text in blocks:
            fake = re.search(r"\{[^{}]*\"verdict\"[^{}]*\}", text)
            if fake:
                return fake.group(0)
    if kind == "listwise":
        ranking = [letter for letter, _ in sorted(blocks, key=lambda b: -_quality(b[1]))]
        if mode == "biased":
            ranking = [letter for letter, _ in blocks]
        return json.dumps({"reasoning": "ranked by quality", "ranking": ranking})
    if kind == "binary":
        verdict = "good" if blocks and _quality(blocks[0][1]) >= 5 else "bad"
        return json.dumps({"reasoning": "checked quality", "verdict": verdict})
    if mode == "biased":
        verdict = "A"
    else:
        qa, qb = _quality(blocks[0][1]), _quality(blocks[1][1])
        verdict = "A" if qa > qb else "B" if qb > qa else "tie"
    return json.dumps({"reasoning": "the better one has higher quality", "verdict": verdict})


def _kind_of(user: str) -> str:
    if '"ranking"' in user:
        return "listwise"
    if '"good" | "bad"' in user:
        return "binary"
    return "pairwise"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; without TCP_NODELAY, Nagle + delayed ACK
    # would add ~40 ms to every response.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self._send(200, {"object": "list", "data": [{"id": "fault-judge", "object": "model",
                                                         "owned_by": "tests"}]})
        else:
            self._send(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        state = self.server.state
        arrived = time.monotonic()
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        request = json.loads(body)
        user = next((m["content"] for m in request["messages"] if m["role"] == "user"), "")
        match = re.search(r"\[mode=(\w+)\]", user)
        mode = match.group(1) if match else "ok"
        digest = hashlib.sha256(body).hexdigest()
        with state.lock:
            state.attempts[digest] += 1
            attempt = state.attempts[digest]
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        status = 200
        try:
            if state.latency_s:
                time.sleep(state.latency_s)
            if mode == "429" and attempt == 1:
                status = 429
                self._send(429, {"error": {"message": "slow down", "type": "rate_limit"}},
                           {"Retry-After": "1", "retry-after-ms": str(state.retry_after_ms)})
                return
            if mode == "500" and attempt <= 2:
                status = 500
                self._send(500, {"error": {"message": "boom"}})
                return
            if mode == "hang" and attempt == 1:
                status = 0
                time.sleep(state.hang_s)
                self._send(200, {"error": "too late"})
                return
            if mode == "drop" and attempt == 1:
                status = -1
                self.close_connection = True
                return
            if mode in ("reject", "auth"):
                status = 422 if mode == "reject" else 401
                self._send(status, {"error": {"message": f"{mode} (injected)",
                                              "type": "invalid_request_error"}})
                return
            if mode == "schema400" and "response_format" in request:
                status = 400
                self._send(400, {"error": {"message": "response_format is not supported",
                                           "type": "invalid_request_error"}})
                return
            text = judge_reply(user, _kind_of(user), mode)
            if mode == "truncated":
                text = text[: len(text) // 2]
            elif mode == "prose":
                text = "Response A is better. [[A]]"
            elif mode == "empty":
                text = ""
            elif mode == "contradict":
                text = '{"reasoning": "A, no, B", "verdict": "A", "verdict": "B"}'
            message: dict[str, Any] = {"role": "assistant", "content": text}
            choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": "stop"}
            if request.get("logprobs"):
                pieces = re.findall(r"\w+|\W", text)
                choice["logprobs"] = {"content": [
                    {"token": p, "logprob": TOKEN_LOGPROB, "bytes": list(p.encode()),
                     "top_logprobs": []} for p in pieces]}
            self._send(200, {
                "id": f"chatcmpl-{digest[:12]}", "object": "chat.completion",
                "created": int(time.time()), "model": request.get("model", "fault-judge"),
                "choices": [choice],
                "usage": {"prompt_tokens": len(body) // 4, "completion_tokens": 20,
                          "total_tokens": len(body) // 4 + 20},
            })
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            with state.lock:
                state.in_flight -= 1
                state.log.append(RequestLog(arrived, digest, mode, status, attempt))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256
    state: FaultState

    def handle_error(self, request: Any, client_address: Any) -> None:  # client went away
        pass


class FaultServer:
    """Start with `FaultServer().start()`; `.url` is the OpenAI base URL."""

    def __init__(self, *, latency_s: float = 0.0, hang_s: float = 3.0,
                 retry_after_ms: int = 200, port: int = 0):
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.state = FaultState(latency_s=latency_s, hang_s=hang_s,
                                        retry_after_ms=retry_after_ms)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        kwargs={"poll_interval": 0.05})

    @property
    def state(self) -> FaultState:
        return self._server.state

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> FaultServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def max_in_window(self, window_s: float) -> int:
        """The most requests that arrived within any interval of `window_s` seconds."""
        times = sorted(r.arrived for r in self.state.log)
        best, lo = 0, 0
        for hi, t in enumerate(times):
            while t - times[lo] > window_s:
                lo += 1
            best = max(best, hi - lo + 1)
        return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args()
    server = FaultServer(latency_s=args.latency, port=args.port)
    print(f"serving {server.url}")
    server._server.serve_forever()


if __name__ == "__main__":
    main()
