"""Blue/green redeploy: the app follows the deployed PolicyVersion in the store.

A background thread polls the store (`PREFLOOP_SERVING_POLL_INTERVAL_S`). When the deployed row
names another version, the manager loads it beside the current one, runs a smoke generation (a
fixed prompt, a timeout: a green /health says nothing about a dead engine, vllm#39863), and only
then switches traffic by swapping one reference. Requests hold the engine they started on until
they finish, streams included, so a switch fails no request. The previous version stays loaded
for an instant rollback; older ones are unloaded once their last request is done.

A version that fails to load or to smoke-generate never takes traffic: the current one keeps
serving, and (PREFLOOP_SERVING_REJECT_FAILED, default on) the store marks it rejected with the
reason, which puts its predecessor back as the deployed version.

An upstream server that is not ready (PREFLOOP_SERVING=upstream while vLLM is still loading:
connection refused, its name not resolvable yet, a connect timeout, 502/503/504) is not a
failure of the version: nothing is written to the store, the current version (if any) keeps
serving, and the manager retries with a backoff (the poll interval, doubling, at most
`upstream_retry_max_s`). Meanwhile `status.state` is "waiting for upstream" and a /v1 request
with nothing serving yet gets 503 with Retry-After.

    manager = DeploymentManager(db, settings); manager.start()
    with manager.lease("deployed") as lease:     # or a version name
        lease.engine.submit(...)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app.engines import make_engine
from app.policy_engine import (
    Engine,
    GenerationRequest,
    NoModel,
    ServedPolicy,
    ServingError,
    UpstreamNotReady,
    generate_blocking,
)

if TYPE_CHECKING:
    from app.settings import Settings
    from store.db import Database

log = logging.getLogger("prefloop.deploy")

DEPLOYED_ALIAS = "deployed"  # `model` value that always means the current version
SERVING_ACTOR = "serving"


class SmokeFailed(Exception):
    """A version could not load or answer the smoke prompt in time."""


class SmokeNotReady(SmokeFailed):
    """The smoke test could not run because the upstream server is not ready (UpstreamNotReady):
    not the version's fault, so the manager retries it instead of rejecting it. A SmokeFailed
    still, so callers that only check once (`prefloop deploy`) refuse to promote."""


class Slot:
    """One loaded engine and the requests using it. Unloaded when retired and idle."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.policy = engine.policy
        self.in_flight = 0
        self.retired = False
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            self.in_flight += 1

    def release(self) -> None:
        with self._lock:
            self.in_flight -= 1
            close = self.retired and self.in_flight == 0
        if close:
            self._close()

    def retire(self) -> None:
        with self._lock:
            self.retired = True
            close = self.in_flight == 0
        if close:
            self._close()

    def _close(self) -> None:
        try:
            self.engine.close()
        except Exception:  # unloading must never take the app down
            log.exception("closing the engine of %s failed", self.policy.name)


@dataclass(frozen=True)
class Switch:
    """A completed switch: what changed, and how long loading and the smoke test took."""

    from_name: str | None
    to_name: str
    load_s: float
    smoke_s: float
    total_s: float
    warm: bool  # the version was already loaded (a rollback to the previous one)
    smoke_text: str


@dataclass(frozen=True)
class Refusal:
    policy_id: int
    name: str
    reason: str
    at: float


@dataclass(frozen=True)
class Waiting:
    """The deployed version waits for the upstream server (not a refusal: the store is left
    alone). `since` is the time.time() of the first failed attempt, `retry_in_s` the backoff
    before the next one."""

    policy_id: int
    name: str
    reason: str
    since: float
    attempts: int
    retry_in_s: float


WAITING_FOR_UPSTREAM = "waiting for upstream"


@dataclass
class ServingStatus:
    backend: str
    current: ServedPolicy | None = None
    previous: ServedPolicy | None = None
    last_switch: Switch | None = None
    refusals: list[Refusal] = field(default_factory=list)
    waiting: Waiting | None = None

    @property
    def state(self) -> str:
        """"waiting for upstream" (the deployed version is retried; the current one, if any,
        keeps serving), "serving", or "idle" (nothing deployed, or every candidate refused)."""
        if self.waiting is not None:
            return WAITING_FOR_UPSTREAM
        return "serving" if self.current is not None else "idle"


def smoke_test(engine: Engine, settings: Settings) -> tuple[str, float]:
    """Greedy-generate from the fixed smoke prompt within the timeout. Returns (text, seconds).
    A hang, an exception or an empty answer raises SmokeFailed."""
    request = GenerationRequest(prompt=[{"role": "user", "content": settings.serving_smoke_prompt}],
                                max_tokens=settings.serving_smoke_max_tokens, temperature=0.0)
    started = time.monotonic()
    try:
        try:
            result = generate_blocking(engine, request, timeout_s=settings.serving_smoke_timeout_s)
        except ServingError as exc:
            if "chat template" not in str(exc):
                raise
            # A base model without a chat template gets the prompt as plain text.
            result = generate_blocking(
                engine, GenerationRequest(prompt=settings.serving_smoke_prompt,
                                          max_tokens=request.max_tokens, temperature=0.0),
                timeout_s=settings.serving_smoke_timeout_s)
    except UpstreamNotReady as exc:
        raise SmokeNotReady(f"the upstream server is not ready: {exc}") from exc
    except ServingError as exc:
        raise SmokeFailed(f"smoke generation failed: {exc}") from exc
    if result.completion_tokens == 0 and not result.text:
        raise SmokeFailed("smoke generation produced no tokens")
    return result.text, time.monotonic() - started


def load_with_timeout(policy: ServedPolicy, load: Callable[[ServedPolicy], Engine],
                      timeout_s: float) -> tuple[Engine, float]:
    """Build the engine in a helper thread so a hung load cannot stall the caller.
    Returns (engine, seconds); SmokeFailed on an error or when it takes too long."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["engine"] = load(policy)
        except BaseException as exc:  # reported to the caller below
            box["error"] = exc

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True, name=f"load-{policy.name}")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise SmokeFailed(f"loading took longer than {timeout_s:g} s")
    if "error" in box:
        exc = box["error"]
        if isinstance(exc, ImportError):
            raise exc  # the environment, not the version, is at fault
        if isinstance(exc, UpstreamNotReady):
            raise SmokeNotReady(f"the upstream server is not ready: {exc}") from exc
        raise SmokeFailed(f"loading failed: {type(exc).__name__}: {exc}") from exc
    return box["engine"], time.monotonic() - started


def prepare(policy: ServedPolicy, settings: Settings,
            load: Callable[[ServedPolicy], Engine] | None = None) -> tuple[Engine, Switch]:
    """Load and smoke-test a version; the engine is closed again if the smoke test fails."""
    started = time.monotonic()
    engine, load_s = load_with_timeout(policy, load or (lambda p: make_engine(p, settings)),
                                       settings.serving_load_timeout_s)
    try:
        text, smoke_s = smoke_test(engine, settings)
    except SmokeFailed:
        engine.close()
        raise
    return engine, Switch(None, policy.name, load_s, smoke_s, time.monotonic() - started,
                          warm=False, smoke_text=text)


class DeploymentManager:
    """Serves the deployed version; see the module docstring."""

    upstream_retry_max_s = 15.0  # the longest wait between two tries of a not-ready upstream

    def __init__(self, db: Database, settings: Settings, *,
                 load: Callable[[ServedPolicy], Engine] | None = None):
        self.db = db
        self.settings = settings
        self._load = load or (lambda policy: make_engine(policy, settings))
        self._current: Slot | None = None
        self._previous: Slot | None = None
        self._swap_lock = threading.Lock()  # guards _current/_previous
        self._sync_lock = threading.Lock()  # one sync at a time
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.status = ServingStatus(backend=settings.serving)
        # Versions refused in this process (by id), so a failing one is not retried every poll
        # when the store could not be updated.
        self._refused: dict[int, str] = {}
        self._retry_at = 0.0  # time.monotonic() of the next try of the version that waits
        self._retry_now = False  # wake(): try a waiting version at once

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._follow, daemon=True,
                                        name="prefloop-deploy")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        with self._swap_lock:
            slots, self._current, self._previous = [self._current, self._previous], None, None
        for slot in slots:
            if slot is not None:
                slot.retire()

    def wake(self) -> None:
        """Check the store now instead of at the next poll (and retry a version waiting for the
        upstream server without its backoff)."""
        self._retry_now = True
        self._wake.set()

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception:  # a store outage must not kill the follower; retry next poll
                log.exception("following the deployed policy failed")
            self._wake.wait(self.settings.serving_poll_interval_s)
            self._wake.clear()

    # -- requests ---------------------------------------------------------------------------

    @contextmanager
    def lease(self, model: str) -> Iterator[Slot]:
        """The engine for `model` (the current version's name, the alias "deployed", or the
        warm previous version's name), held until the block exits: a switch meanwhile does
        not unload it."""
        slot = self.acquire(model)
        try:
            yield slot
        finally:
            slot.release()

    def acquire(self, model: str) -> Slot:
        """Like `lease`, for callers that release by hand (streams): call `slot.release()`."""
        with self._swap_lock:
            current, previous = self._current, self._previous
            if current is not None and model in (DEPLOYED_ALIAS, current.policy.name):
                slot = current
            elif previous is not None and model == previous.policy.name:
                slot = previous
            else:
                slot = None
            if slot is not None:
                slot.acquire()  # under the swap lock: it cannot be retired before this
                return slot
        if current is None:
            waiting = self.status.waiting
            if waiting is not None:
                raise UpstreamNotReady(f"waiting for the upstream server to serve "
                                       f"{waiting.name!r} ({waiting.reason}); retry")
            raise NoModel(self._why_not_serving())
        from app.policy_engine import InvalidRequest

        served = ", ".join(m.name for m in self.models())
        error = InvalidRequest(f"model {model!r} is not served here; use one of: {served} "
                               f"(or {DEPLOYED_ALIAS!r} for the deployed version)")
        error.status_code = 404
        raise error

    def models(self) -> list[ServedPolicy]:
        """Served versions: the current first, then the warm previous one."""
        with self._swap_lock:
            return [s.policy for s in (self._current, self._previous) if s is not None]

    def _why_not_serving(self) -> str:
        if self.settings.serving == "off":
            return "serving is off (PREFLOOP_SERVING=off)"
        if self.status.refusals:
            last = self.status.refusals[-1]
            return f"no policy version is serving: {last.name!r} was refused ({last.reason})"
        return "no policy version is serving yet (none deployed, or still loading)"

    # -- following the store ----------------------------------------------------------------

    def sync(self) -> Switch | None:
        """Bring the served version in line with the store's deployed row (one step)."""
        from store import deployments

        with self._sync_lock:
            with self.db.read() as session:
                row = deployments.deployed(session)
                target = None if row is None or row.id is None or not row.weights_uri else \
                    ServedPolicy(row.id, row.name, row.base_model, row.weights_uri)
            waiting, retry_now, self._retry_now = self.status.waiting, self._retry_now, False
            if target is None:
                self._stop_waiting("nothing is deployed any more")
                return None  # nothing deployed: keep serving what we have
            current = self._current
            if current is not None and current.policy.id == target.id:
                self._stop_waiting(f"{target.name!r} is serving")
                return None
            if target.id in self._refused:
                return None
            if (waiting is not None and waiting.policy_id == target.id and not retry_now
                    and time.monotonic() < self._retry_at):
                return None  # backing off
            return self._switch_to(target)

    def _switch_to(self, target: ServedPolicy) -> Switch | None:
        previous = self._previous
        started = time.monotonic()
        try:
            if previous is not None and previous.policy.id == target.id:
                # Rollback to the warm previous version: re-check it, no load.
                text, smoke_s = smoke_test(previous.engine, self.settings)
                slot = previous
                switch = Switch(None, target.name, 0.0, smoke_s, 0.0, True, text)
            else:
                engine, switch = prepare(target, self.settings, self._load)
                slot = Slot(engine)
        except SmokeNotReady as exc:
            self._wait_for_upstream(target, str(exc))
            return None
        except SmokeFailed as exc:
            self._stop_waiting(None)
            self._refuse(target, str(exc))
            return None
        except ImportError as exc:
            # Not the version's fault: say what to install, never reject it for this.
            self._refused[target.id] = str(exc)
            self._record_refusal(target, f"cannot load here: {exc} (install the train extra, "
                                 "or set PREFLOOP_SERVING=upstream)")
            return None
        self._stop_waiting(None)
        with self._swap_lock:
            old_current, old_previous = self._current, self._previous
            self._current = slot
            self._previous = old_current if self.settings.serving_keep_previous else None
        evicted = [s for s in (old_previous, old_current)
                   if s is not None and s is not slot and s is not self._previous]
        for s in evicted:
            s.retire()  # unloaded once its in-flight requests are done
        switch = Switch(old_current.policy.name if old_current else None, target.name,
                        switch.load_s, switch.smoke_s, time.monotonic() - started, switch.warm,
                        switch.smoke_text)
        self.status.current, self.status.previous = slot.policy, (
            self._previous.policy if self._previous else None)
        self.status.last_switch = switch
        log.info("serving %s (from %s): load %.2f s, smoke %.2f s", switch.to_name,
                 switch.from_name, switch.load_s, switch.smoke_s)
        return switch

    def _refuse(self, target: ServedPolicy, reason: str) -> None:
        from store import deployments

        self._refused[target.id] = reason
        if self.settings.serving_reject_failed:
            try:
                self.db.run_write(lambda s: deployments.reject(
                    s, policy_id=target.id, actor=SERVING_ACTOR, reason=reason))
            except Exception:
                log.exception("could not record the rejection of %s", target.name)
            self._wake.set()  # the store now deploys the predecessor again: follow it
        self._record_refusal(target, reason)

    def _record_refusal(self, target: ServedPolicy, reason: str) -> None:
        log.warning("refused policy version %s: %s", target.name, reason)
        self.status.refusals = [*self.status.refusals[-9:],
                                Refusal(target.id, target.name, reason, time.time())]

    def _wait_for_upstream(self, target: ServedPolicy, reason: str) -> None:
        """Not a refusal: nothing goes to the store; retry after a backoff. Logged when the
        waiting starts, not at every try."""
        waiting = self.status.waiting
        attempts = waiting.attempts + 1 if waiting and waiting.policy_id == target.id else 1
        poll = self.settings.serving_poll_interval_s
        delay = min(max(self.upstream_retry_max_s, poll), poll * 2 ** min(attempts - 1, 30))
        self._retry_at = time.monotonic() + delay
        self.status.waiting = Waiting(target.id, target.name, reason,
                                      waiting.since if attempts > 1 and waiting else time.time(),
                                      attempts, delay)
        if attempts == 1:
            log.warning("waiting for the upstream server before serving %s: %s (not a "
                        "rejection; retrying with a backoff of up to %g s)", target.name,
                        reason, max(self.upstream_retry_max_s, poll))
        else:
            log.debug("%s: the upstream server is still not ready (try %d): %s", target.name,
                      attempts, reason)

    def _stop_waiting(self, why: str | None) -> None:
        waiting, self.status.waiting = self.status.waiting, None
        if waiting is not None:
            log.info("no longer waiting for the upstream server for %s after %d tries%s",
                     waiting.name, waiting.attempts, f": {why}" if why else "")
