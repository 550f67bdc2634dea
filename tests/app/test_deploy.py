"""Blue/green redeploy: the app follows the store's deployed version, refuses a candidate that
hangs or fails (the current one keeps serving, the store records why), rolls back to the warm
previous version, finishes in-flight streams on the version they started on, and fails no
request while switching under concurrent load. Also `prefloop deploy` / `prefloop rollback`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from app.local_engine import LocalEngine
from app.policy_engine import Delta, ServedPolicy
from store import deployments
from store.models import PolicyStatus, PolicyVersion
from tests.app.serving_fixtures import *  # noqa: F403  (fixtures and helpers)
from tests.app.serving_fixtures import expected, register, wait_until

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Write a poem"  # the three tiny versions answer it differently


def _statuses(db):
    with db.read() as s:
        return {p.name: p.status for p in s.exec(__import__("sqlmodel").select(PolicyVersion))}


def _deploy(db, policy_id):
    db.run_write(lambda s: deployments.promote(s, policy_id=policy_id, actor="test"))


def _answer(app, model="deployed", max_tokens=12):
    response = app.client(max_retries=0).completions.create(
        model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0)
    return response.model, response.choices[0].text


def _grown(items, size):
    return lambda: len(items) > size


def _serving(app, name):
    return wait_until(lambda: app.manager.status.current is not None
                      and app.manager.status.current.name == name)


class HangingEngine:
    """Loads fine, never answers: the dead-engine-behind-a-green-health case."""

    def __init__(self, policy):
        self.policy = policy
        self.closed = threading.Event()

    def submit(self, request, emit):
        from app.policy_engine import Job

        return Job(request, emit)

    def close(self):
        self.closed.set()


class RaisingEngine(LocalEngine):
    """A real engine whose model fails inside its forward pass."""

    def __init__(self, policy):
        super().__init__(policy)

        def fail(*args, **kwargs):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        self.generator.decoder.forward_segments = fail


def _loader(faulty: dict):
    def load(policy: ServedPolicy):
        kind = faulty.get(policy.name)
        if kind == "hang":
            return HangingEngine(policy)
        if kind == "raise":
            return RaisingEngine(policy)
        return LocalEngine(policy)
    return load


@pytest.mark.parametrize("fault, reason", [
    ("hang", "smoke generation failed: no answer within 2 s"),
    ("raise", "smoke generation failed: generation failed: RuntimeError: CUDA error"),
])
def test_a_candidate_that_hangs_or_raises_is_refused_and_the_current_keeps_serving(
        sqlite_db, serve, tiny_policies, fault, reason):
    v1, v2 = register(sqlite_db, "v1", tiny_policies["v1"]), register(
        sqlite_db, "v2", tiny_policies["v2"])
    _deploy(sqlite_db, v1)
    app = serve(sqlite_db, load=_loader({"v2": fault}), serving_smoke_timeout_s=2.0)
    _serving(app, "v1")
    _deploy(sqlite_db, v2)
    app.manager.wake()
    wait_until(lambda: app.manager.status.refusals)
    [refusal] = app.manager.status.refusals
    assert (refusal.name, refusal.reason.startswith(reason)) == ("v2", True), refusal.reason
    assert _statuses(sqlite_db) == {"v1": PolicyStatus.deployed, "v2": PolicyStatus.rejected}
    with sqlite_db.read() as s:
        assert deployments.last_reason(s, policy_id=v2) == refusal.reason
        [reject, restore] = [(e.policy_id, e.action, e.actor)
                             for e in deployments.history(s, limit=2)][::-1]
    assert (reject, restore) == ((v2, "reject", "serving"), (v1, "rollback", "serving"))
    assert _answer(app) == ("v1", expected(tiny_policies["v1"], PROMPT, 12).text)
    assert [m.name for m in app.manager.models()] == ["v1"]
    status = httpx.get(f"{app.url}/v1/serving",
                       headers={"Authorization": f"Bearer {app.token}"}).json()
    assert status["current"]["name"] == "v1" and status["refusals"][0]["name"] == "v2"


def test_a_candidate_with_broken_weights_is_refused_at_load(sqlite_db, serve, tiny_policies,
                                                            tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_policies["v2"], broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    v1, v2 = register(sqlite_db, "v1", tiny_policies["v1"]), register(sqlite_db, "v2", broken)
    _deploy(sqlite_db, v1)
    app = serve(sqlite_db)
    _serving(app, "v1")
    _deploy(sqlite_db, v2)
    app.manager.wake()
    wait_until(lambda: app.manager.status.refusals)
    assert app.manager.status.refusals[0].reason.startswith("loading failed: ")
    assert _statuses(sqlite_db) == {"v1": PolicyStatus.deployed, "v2": PolicyStatus.rejected}
    assert _answer(app)[0] == "v1"


def test_promote_switches_and_rollback_returns_to_the_warm_previous(sqlite_db, serve,
                                                                    tiny_policies):
    v1, v2 = register(sqlite_db, "v1", tiny_policies["v1"]), register(
        sqlite_db, "v2", tiny_policies["v2"])
    _deploy(sqlite_db, v1)
    app = serve(sqlite_db)
    _serving(app, "v1")
    _deploy(sqlite_db, v2)
    app.manager.wake()
    _serving(app, "v2")
    switch = app.manager.status.last_switch
    assert (switch.from_name, switch.to_name, switch.warm) == ("v1", "v2", False)
    assert [m.name for m in app.manager.models()] == ["v2", "v1"]
    assert _answer(app) == ("v2", expected(tiny_policies["v2"], PROMPT, 12).text)
    # The previous version is still served by name while it stays warm.
    assert _answer(app, model="v1") == ("v1", expected(tiny_policies["v1"], PROMPT, 12).text)

    sqlite_db.run_write(lambda s: deployments.rollback(s, actor="ana"))
    app.manager.wake()
    _serving(app, "v1")
    switch = app.manager.status.last_switch
    assert (switch.from_name, switch.to_name, switch.warm, switch.load_s) == ("v2", "v1", True,
                                                                              0.0)
    assert _answer(app) == ("v1", expected(tiny_policies["v1"], PROMPT, 12).text)
    assert _statuses(sqlite_db) == {"v1": PolicyStatus.deployed, "v2": PolicyStatus.retired}


class GatedEngine(LocalEngine):
    """Pauses each generation after its first piece of text until `gate` is set."""

    gate = threading.Event()
    closed = threading.Event()

    def submit(self, request, emit):
        first = [True]

        def gated(event):
            emit(event)
            if isinstance(event, Delta) and first[0]:
                first[0] = False
                assert self.gate.wait(60)

        return super().submit(request, gated)

    def close(self):
        type(self).closed.set()
        super().close()


def test_a_stream_in_flight_finishes_on_its_version_across_two_switches(sqlite_db, serve,
                                                                        tiny_policies):
    names = ["v1", "v2", "v3"]
    ids = {n: register(sqlite_db, n, tiny_policies[n]) for n in names}
    _deploy(sqlite_db, ids["v1"])
    GatedEngine.gate.set()  # the smoke test must pass
    app = serve(sqlite_db, load=lambda p: (GatedEngine if p.name == "v1" else LocalEngine)(p))
    _serving(app, "v1")
    GatedEngine.gate.clear()
    stream = app.client(max_retries=0).completions.create(
        model="deployed", prompt=PROMPT, max_tokens=30, temperature=0, stream=True)
    chunks = [next(stream)]
    for name in ("v2", "v3"):  # v1 becomes the previous, then is evicted
        _deploy(sqlite_db, ids[name])
        app.manager.wake()
        _serving(app, name)
    assert [m.name for m in app.manager.models()] == ["v3", "v2"]
    assert not GatedEngine.closed.is_set()  # evicted, but its stream is still running
    GatedEngine.gate.set()
    chunks += list(stream)
    assert {c.model for c in chunks} == {"v1"}
    assert "".join(c.choices[0].text for c in chunks) == expected(
        tiny_policies["v1"], PROMPT, 30).text
    wait_until(GatedEngine.closed.is_set)  # unloaded once its last request ended


def test_switching_under_concurrent_load_fails_no_request(sqlite_db, serve, tiny_policies):
    """Clients stream and call plainly while v1 -> v2 -> v3 -> v2 (rollback) switch; every
    request succeeds and every answer is exactly one version's greedy output."""
    names = ["v1", "v2", "v3"]
    ids = {n: register(sqlite_db, n, tiny_policies[n]) for n in names}
    want = {n: expected(tiny_policies[n], PROMPT, 12).text for n in names}
    assert len(set(want.values())) == 3
    _deploy(sqlite_db, ids["v1"])
    app = serve(sqlite_db)
    _serving(app, "v1")
    stop = threading.Event()
    results: list[tuple[str, str]] = []
    failures: list[str] = []

    def client_loop(i: int) -> None:
        client = app.client(max_retries=0, timeout=120)
        while not stop.is_set():
            try:
                if i % 2:
                    chunks = list(client.completions.create(
                        model="deployed", prompt=PROMPT, max_tokens=12, temperature=0,
                        stream=True))
                    models = {c.model for c in chunks}
                    text = "".join(c.choices[0].text for c in chunks)
                    model = models.pop() if len(models) == 1 else f"mixed {models}"
                else:
                    r = client.completions.create(model="deployed", prompt=PROMPT,
                                                  max_tokens=12, temperature=0)
                    model, text = r.model, r.choices[0].text
                results.append((model, text))
            except Exception as exc:  # counted: the test wants none
                failures.append(f"{type(exc).__name__}: {exc}")

    with ThreadPoolExecutor(6) as pool:
        for i in range(6):
            pool.submit(client_loop, i)
        for name, change in (("v2", "promote"), ("v3", "promote"), ("v2", "rollback")):
            if change == "promote":
                _deploy(sqlite_db, ids[name])
            else:
                sqlite_db.run_write(lambda s: deployments.rollback(s, actor="test"))
            app.manager.wake()
            _serving(app, name)
            wait_until(_grown(results, len(results) + 6))  # some answers from the new version
        stop.set()
    assert failures == []
    assert {model for model, _ in results} == {"v1", "v2", "v3"}
    assert [(m, t) for m, t in results if want.get(m) != t] == []


# -- the CLI ----------------------------------------------------------------------------------


def _cli(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PREFLOOP_SERVING_SMOKE_TIMEOUT_S": "60"}
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), "--db", db_url, *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_cli_deploy_smoke_tests_then_promotes_and_rollback_goes_back(tmp_path, tiny_policies):
    url = f"sqlite:///{tmp_path}/cli.db"
    first = _cli(url, "deploy", "v1", "--weights", str(tiny_policies["v1"]))
    assert first.returncode == 0, first.stderr
    assert "registered 'v1' (id 1)" in first.stdout and "deployed 'v1' (id 1)" in first.stdout
    second = _cli(url, "deploy", "v2", "--weights", str(tiny_policies["v2"]))
    assert second.returncode == 0, second.stderr
    again = _cli(url, "deploy", "2")
    assert (again.returncode, again.stdout.strip()) == (
        0, "'v2' (id 2) is already the deployed version")
    back = _cli(url, "rollback")
    assert (back.returncode, back.stdout.strip()) == (0, "rolled back from 'v2' to 'v1' (id 1)")

    from store.db import Database

    db = Database.from_url(url)
    try:
        assert _statuses(db) == {"v1": PolicyStatus.deployed, "v2": PolicyStatus.retired}
        with db.read() as s:
            actors = {e.actor for e in deployments.history(s)}
        assert all(a is None or a.startswith("cli") for a in actors)
    finally:
        db.dispose()


def test_cli_deploy_refuses_bad_versions_with_exit_2_and_changes_nothing(tmp_path,
                                                                         tiny_policies):
    url = f"sqlite:///{tmp_path}/cli.db"
    assert _cli(url, "deploy", "v1", "--weights", str(tiny_policies["v1"])).returncode == 0
    broken = tmp_path / "broken"
    shutil.copytree(tiny_policies["v2"], broken)
    (broken / "config.json").write_text("{ not json")
    bad = _cli(url, "deploy", "v2", "--weights", str(broken))
    assert bad.returncode == 2
    assert "'v2' not deployed: loading failed" in bad.stderr
    missing = _cli(url, "deploy", "nope")
    assert missing.returncode == 2 and "no policy version 'nope'" in missing.stderr
    nothing = _cli(f"sqlite:///{tmp_path}/empty.db", "rollback")
    assert nothing.returncode == 2 and "nothing to roll back" in nothing.stderr

    from store.db import Database

    db = Database.from_url(url)
    try:
        assert _statuses(db) == {"v1": PolicyStatus.deployed, "v2": PolicyStatus.candidate}
    finally:
        db.dispose()
