"""A cold start with PREFLOOP_SERVING=upstream: vLLM is still loading when the app starts.

An upstream that is not ready (nothing listening, a name that does not resolve, a connection
closed before any answer, 502/503/504) is not the version's fault: the deployed version is not
rejected, the store is left exactly as it was, /v1 answers 503 with Retry-After, and the manager
serves the version as soon as the upstream answers. An upstream that answers 404 (model unknown)
still gets the version rejected. The upstream is a small real HTTP server in a thread.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlmodel

from app.deploy import WAITING_FOR_UPSTREAM
from app.policy_engine import (
    EngineFailed,
    GenerationRequest,
    InvalidRequest,
    ServedPolicy,
    UpstreamNotReady,
    generate_blocking,
)
from app.upstream_engine import UpstreamEngine
from store import deployments
from store.models import PolicyStatus, PolicyVersion
from tests.app.helpers import free_port
from tests.app.serving_fixtures import *  # noqa: F403  (fixtures and helpers)
from tests.app.serving_fixtures import wait_until

ROOT = Path(__file__).resolve().parents[2]
CHAT = [{"role": "user", "content": "Say hi."}]


class FakeUpstream:
    """An OpenAI-compatible server that streams each model's fixed text as SSE chunks.

    `texts[model]` is what `model` (the weights_uri the app sends) answers; `status[model]`
    makes it answer that HTTP status instead (503 while loading); an unknown model gets vLLM's
    404. `status[model] = "cut"` sends the headers and one chunk, then drops the connection."""

    def __init__(self, port: int = 0):
        self.texts: dict[str, str] = {}
        self.status: dict[str, int | str] = {}
        self.models_asked: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.answer(self, body, chat=self.path.endswith("/chat/completions"))

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, handler: BaseHTTPRequestHandler, body: dict[str, Any], chat: bool) -> None:
        model = body["model"]
        self.models_asked.append(model)
        status = self.status.get(model, 200 if model in self.texts else 404)
        if status == "cut":
            handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                b"Transfer-Encoding: chunked\r\n\r\n" + b"5\r\ndata:\r\n")
            handler.close_connection = True
            return
        if status != 200:
            message = (f"The model `{model}` does not exist." if status == 404
                       else "the engine is still loading")
            payload = json.dumps({"object": "error", "message": message, "type": "Error",
                                  "param": None, "code": status}).encode()
            handler.send_response(int(status))
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
            return
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.end_headers()  # HTTP/1.0: the body ends when the connection closes
        pieces = re.findall(r"\S+\s*", self.texts[model])
        for i, piece in enumerate(pieces):
            choice: dict[str, Any] = ({"index": 0, "delta": {"content": piece}} if chat
                                      else {"index": 0, "text": piece})
            choice["finish_reason"] = "stop" if i == len(pieces) - 1 else None
            handler.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
        usage = {"prompt_tokens": 7, "completion_tokens": len(pieces),
                 "total_tokens": 7 + len(pieces)}
        handler.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                            "data: [DONE]\n\n".encode())

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=30)


@pytest.fixture
def upstream() -> Iterator[Callable[..., FakeUpstream]]:
    """upstream(port=0) -> a running FakeUpstream (stopped at the end of the test)."""
    started: list[FakeUpstream] = []

    def start(port: int = 0) -> FakeUpstream:
        started.append(FakeUpstream(port))
        return started[-1]

    yield start
    for fake in started:
        fake.close()


def _closed_port() -> int:
    """A local port nothing listens on (bound, then closed again)."""
    return free_port()


def _register(db, name: str) -> int:
    policy = db.run_write(lambda s: deployments.register_policy(
        s, name=name, base_model="tiny", weights_uri=f"/models/{name}"))
    assert policy.id is not None
    return policy.id


def _deploy(db, policy_id: int) -> None:
    db.run_write(lambda s: deployments.promote(s, policy_id=policy_id, actor="test"))


def _store_state(db) -> tuple[list[dict[str, Any]], list[Any]]:
    """Every PolicyVersion row and the whole deployment trail, to compare before and after."""
    with db.read() as s:
        rows = [p.model_dump() for p in s.exec(sqlmodel.select(PolicyVersion)
                                                .order_by(PolicyVersion.id))]
        return rows, deployments.history(s)


def _chat(app, model: str = "deployed") -> httpx.Response:
    return httpx.post(f"{app.url}/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {app.token}"},
                      json={"model": model, "messages": CHAT, "max_tokens": 8})


def _serving(app, name: str) -> None:
    wait_until(lambda: app.manager.status.current is not None
               and app.manager.status.current.name == name)


def _waited(app, name: str, attempts: int = 3) -> Any:
    """The manager's Waiting record once it has tried `name` at least `attempts` times."""
    return wait_until(lambda: (w := app.manager.status.waiting) is not None
                      and w.name == name and w.attempts >= attempts and w)


def test_a_cold_start_waits_for_the_upstream_without_rejecting_then_serves(
        sqlite_db, serve, upstream):
    port = _closed_port()
    v1 = _register(sqlite_db, "v1")
    _deploy(sqlite_db, v1)
    before = _store_state(sqlite_db)
    app = serve(sqlite_db, serving="upstream", serving_upstream_url=f"http://127.0.0.1:{port}/v1")
    app.manager.upstream_retry_max_s = 0.5  # keep the backoff short for the test

    waiting = _waited(app, "v1")
    assert (waiting.policy_id, waiting.reason) == (v1, (
        "the upstream server is not ready: upstream not reachable: ConnectError: "
        "[Errno 111] Connection refused"))
    status = app.manager.status
    assert (status.state, status.current, status.refusals) == (WAITING_FOR_UPSTREAM, None, [])
    # Nothing was written: the row is still the deployed one, the trail has no rejection.
    assert _store_state(sqlite_db) == before
    [row], trail = before
    assert (row["id"], row["name"], row["weights_uri"], row["status"]) == (
        v1, "v1", "/models/v1", PolicyStatus.deployed)
    assert [e.action for e in trail if e.action == "reject"] == []

    # Admins see it on /v1/serving.
    shown = httpx.get(f"{app.url}/v1/serving",
                      headers={"Authorization": f"Bearer {app.token}"}).json()
    assert (shown["state"], shown["waiting"]["name"], shown["waiting"]["policy_id"]) == (
        WAITING_FOR_UPSTREAM, "v1", v1)
    assert shown["waiting"]["attempts"] >= 1 and shown["current"] is None

    answer = _chat(app)
    assert answer.status_code == 503
    assert answer.headers["Retry-After"] == "1"
    error = answer.json()["error"]
    assert error["type"] == "upstream_not_ready"
    assert error["message"].startswith("waiting for the upstream server to serve 'v1' (")

    # vLLM comes up on that port: the manager switches without anyone waking it.
    fake = upstream(port)
    fake.texts["/models/v1"] = "Hi there, annotator!"
    _serving(app, "v1")
    assert (app.manager.status.state, app.manager.status.waiting) == ("serving", None)
    answer = _chat(app)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["model"], body["choices"][0]["message"]["content"]) == (
        "v1", "Hi there, annotator!")
    assert body["usage"]["completion_tokens"] == 3
    assert _store_state(sqlite_db) == before


def test_an_upstream_answering_503_is_waited_for_while_the_current_version_serves(
        sqlite_db, serve, upstream):
    fake = upstream()
    fake.texts.update({"/models/v1": "one", "/models/v2": "two"})
    v1, v2 = _register(sqlite_db, "v1"), _register(sqlite_db, "v2")
    _deploy(sqlite_db, v1)
    app = serve(sqlite_db, serving="upstream", serving_upstream_url=fake.url)
    app.manager.upstream_retry_max_s = 0.5
    _serving(app, "v1")

    fake.status["/models/v2"] = 503  # v2's server is still loading
    _deploy(sqlite_db, v2)
    before = _store_state(sqlite_db)
    app.manager.wake()
    waiting = _waited(app, "v2")
    assert waiting.reason.startswith(
        "the upstream server is not ready: upstream answered 503: ")
    assert app.manager.status.state == WAITING_FOR_UPSTREAM
    assert app.manager.status.refusals == []
    assert _store_state(sqlite_db) == before  # v2 stays the deployed row, not rejected
    with sqlite_db.read() as s:
        assert deployments.deployed(s).id == v2
    # The current version keeps serving meanwhile.
    answer = _chat(app)
    assert (answer.status_code, answer.json()["model"],
            answer.json()["choices"][0]["message"]["content"]) == (200, "v1", "one")

    del fake.status["/models/v2"]  # loaded
    _serving(app, "v2")
    answer = _chat(app)
    assert (answer.status_code, answer.json()["choices"][0]["message"]["content"]) == (
        200, "two")
    assert app.manager.status.waiting is None
    assert _store_state(sqlite_db) == before


def test_an_upstream_answering_404_still_rejects_the_version(sqlite_db, serve, upstream):
    fake = upstream()
    fake.texts["/models/v1"] = "one"  # v2's model is unknown upstream: 404
    v1, v2 = _register(sqlite_db, "v1"), _register(sqlite_db, "v2")
    _deploy(sqlite_db, v1)
    app = serve(sqlite_db, serving="upstream", serving_upstream_url=fake.url)
    _serving(app, "v1")
    _deploy(sqlite_db, v2)
    app.manager.wake()
    wait_until(lambda: app.manager.status.refusals)
    [refusal] = app.manager.status.refusals
    assert (refusal.policy_id, refusal.reason) == (v2, (
        'smoke generation failed: upstream answered 404: {"object": "error", "message": '
        '"The model `/models/v2` does not exist.", "type": "Error", "param": null, '
        '"code": 404}'))
    assert app.manager.status.waiting is None
    with sqlite_db.read() as s:
        statuses = {p.name: p.status for p in s.exec(sqlmodel.select(PolicyVersion))}
        assert deployments.last_reason(s, policy_id=v2) == refusal.reason
    assert statuses == {"v1": PolicyStatus.deployed, "v2": PolicyStatus.rejected}
    assert "/models/v2" in fake.models_asked
    answer = _chat(app)
    assert (answer.status_code, answer.json()["model"]) == (200, "v1")


def test_cli_deploy_against_an_upstream_not_ready_changes_nothing(tmp_path):
    port = _closed_port()
    url = f"sqlite:///{tmp_path}/cli.db"
    env = {**os.environ, "PREFLOOP_SERVING": "upstream",
           "PREFLOOP_SERVING_UPSTREAM_URL": f"http://127.0.0.1:{port}/v1"}
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "--db", url, "deploy", "v1",
                             "--weights", "/models/v1"], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 2, result.stderr
    assert ("'v1' not deployed: the upstream server is not ready: upstream not reachable: "
            "ConnectError: [Errno 111] Connection refused") in result.stderr

    from store.db import Database

    db = Database.from_url(url)
    try:
        [row], trail = _store_state(db)
        assert (row["name"], row["status"]) == ("v1", PolicyStatus.candidate)
        assert [e.action for e in trail] == ["register"]
    finally:
        db.dispose()


# -- which upstream failures are "not ready" ---------------------------------------------------


def _hang_up_server() -> tuple[str, Callable[[], None]]:
    """A server that reads each request and closes the connection without answering."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection, connection.makefile("rb") as request:
                # Read the whole request (unread bytes would make close() a reset), then hang up.
                length = 0
                while (line := request.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request.read(length)

    threading.Thread(target=run, daemon=True).start()

    def close() -> None:
        stop.set()
        listener.close()

    return f"http://127.0.0.1:{listener.getsockname()[1]}/v1", close


def _generate(base_url: str, model: str = "/models/v1") -> Any:
    engine = UpstreamEngine(ServedPolicy(1, "v1", "tiny", model), base_url=base_url,
                            model=model)
    try:
        return generate_blocking(engine, GenerationRequest(prompt=CHAT, max_tokens=8),
                                 timeout_s=60)
    finally:
        engine.close()


@pytest.mark.parametrize("where", ["closed port", "unresolvable name", "hangs up"])
def test_an_unreachable_upstream_is_not_ready(where):
    close = None
    if where == "closed port":
        url = f"http://127.0.0.1:{_closed_port()}/v1"
    elif where == "unresolvable name":
        url = "http://prefloop-upstream.invalid:8000/v1"  # .invalid never resolves (RFC 6761)
    else:
        url, close = _hang_up_server()
    try:
        with pytest.raises(UpstreamNotReady, match=r"^upstream not reachable: ") as caught:
            _generate(url)
    finally:
        if close:
            close()
    assert (caught.value.status_code, caught.value.error_type) == (503, "upstream_not_ready")


@pytest.mark.parametrize("status, error", [
    (502, UpstreamNotReady), (503, UpstreamNotReady), (504, UpstreamNotReady),
    (400, InvalidRequest), (404, EngineFailed), (500, EngineFailed), ("cut", EngineFailed),
])
def test_which_upstream_answers_are_not_ready(upstream, status, error):
    fake = upstream()
    fake.texts["/models/v1"] = "one"
    fake.status["/models/v1"] = status
    with pytest.raises(error) as caught:
        _generate(fake.url)
    assert type(caught.value) is error
    if status == "cut":  # cut after the answer started: the engine failed, not "not ready"
        assert "RemoteProtocolError" in str(caught.value)
    else:
        assert str(caught.value).startswith(f"upstream answered {status}: ")


# -- docker/compose.yaml ----------------------------------------------------------------------


def _seconds(duration: str) -> float:
    """A Go duration as Compose renders it ("5m0s")."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|h|m|s)", duration))


def test_compose_starts_the_app_once_vllm_is_healthy():
    from tests.docker.test_docker_files import rendered

    services = rendered()["services"]
    depends = services["app"]["depends_on"]
    assert {name: d["condition"] for name, d in depends.items()} == {
        "postgres": "service_healthy", "vllm": "service_healthy"}
    vllm = services["vllm"]
    port = vllm["command"][vllm["command"].index("--port") + 1]
    check = vllm["healthcheck"]
    assert check["test"][0] == "CMD" and f"http://127.0.0.1:{port}/health" in check["test"][-1]
    assert _seconds(check["start_period"]) >= 300  # room for the model to load
    # Unchanged security settings of the app.
    app = services["app"]
    assert app["read_only"] is True and app["cap_drop"] == ["ALL"]
    assert app["security_opt"] == ["no-new-privileges:true"]
