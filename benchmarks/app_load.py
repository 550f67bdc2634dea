"""Load, stress and crash benchmark of the annotator service, run against `prefloop up`.

Simulated annotators (async HTTP/1.1 keep-alive clients, one connection each) pull a pairwise
task, think, and submit a label with an Idempotency-Key, retrying with the same key on
connection errors, 5xx and 429. Afterwards the store is compared with what the server
acknowledged: lost = acknowledged but not stored, duplicated = a submission stored twice or a
task labelled beyond its overlap. With --kills N the server is SIGKILLed and restarted N times
during the run. For a baseline measured in the same
run, the same next+submit is then timed through the store alone (no HTTP).

    python benchmarks/app_load.py --backend sqlite --annotators 50 --duration 60
    python benchmarks/app_load.py --backend postgresql --annotators 50 --duration 60
    python benchmarks/app_load.py --backend sqlite --think-max 0 --duration 30      # stress
    python benchmarks/app_load.py --backend sqlite --kills 5 --duration 60          # crashes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.load_client import RawClient, TransportError  # noqa: E402
from store import accounts, assignment, migrate, repo  # noqa: E402
from store.db import Database, normalise_url  # noqa: E402
from store.models import Annotator, Label, Role, TaskKind  # noqa: E402

PG_ADMIN_URL = os.environ.get("PREFLOOP_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
CHOICES = ("a", "b", "tie", "both_bad")


@dataclass
class LoadConfig:
    backend: str = "sqlite"
    annotators: int = 50
    duration_s: float = 60.0
    think_max_s: float = 2.0
    kills: int = 0
    synchronous: str = "FULL"
    workers: int = 1
    tasks: int | None = None
    warmup_s: float = 5.0
    submit_attempts: int = 60  # ~110 s of retrying: a restart under heavy load can take 50 s+
    baseline_ops: int = 300
    workdir: Path | None = None
    keep: bool = False


@dataclass
class Results:
    config: dict[str, Any]
    acked: int = 0
    lost: int = 0
    duplicated: int = 0
    over_overlap: int = 0
    stored_not_acked: int = 0
    label_id_mismatch: int = 0
    http_5xx: int = 0
    http_429: int = 0
    http_other_4xx: Counter[int] = field(default_factory=Counter)
    connect_errors: int = 0
    gave_up: int = 0
    first_errors: list[str] = field(default_factory=list)
    writes_per_s: float = 0.0
    submit_p50_ms: float | None = None
    submit_p99_ms: float | None = None
    submit_max_ms: float | None = None
    next_p50_ms: float | None = None
    next_p99_ms: float | None = None
    restarts_s: list[float] = field(default_factory=list)
    integrity: str = ""
    store_only_p50_ms: float | None = None
    store_only_ops_per_s: float | None = None
    http_over_store_p50: float | None = None
    # The server's own code path (app.annotation: two write transactions and the texts read),
    # called in-process: everything but HTTP, auth, routing and JSON.
    service_only_p50_ms: float | None = None
    service_only_ops_per_s: float | None = None
    http_over_service_p50: float | None = None
    # CPU the server process(es) and this load generator used during the load, per acked label
    # (the machine's load average moves wall-clock figures; these move much less).
    server_cpu_ms_per_label: float | None = None
    client_cpu_ms_per_label: float | None = None
    load_average: tuple[float, float, float] | None = None


# ---------------------------------------------------------------------------------------------
# The store: a fresh database, accounts and tasks


def fresh_database(cfg: LoadConfig, workdir: Path) -> str:
    if cfg.backend == "sqlite":
        return f"sqlite:///{workdir / 'prefloop.db'}"
    name = f"prefloop_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(normalise_url(PG_ADMIN_URL), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(normalise_url(PG_ADMIN_URL)).set(database=name).render_as_string(
        hide_password=False)


def drop_database(url: str) -> None:
    if url.startswith("sqlite"):
        return
    name = make_url(url).database
    admin = create_engine(normalise_url(PG_ADMIN_URL), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def seed(db: Database, annotators: int, tasks: int) -> dict[int, str]:
    """Accounts (annotator id -> token) and `tasks` pairwise tasks over 50 prompts."""
    migrate.upgrade(db.engine)
    tokens: dict[int, str] = {}
    with db.write() as session:
        for i in range(annotators + 1):  # the last one is the store-only baseline's
            annotator, token = accounts.create_account(
                session=session, name=f"sim{i:03d}", role=Role.annotator,
                token_ttl=timedelta(days=1))
            assert annotator.id is not None
            tokens[annotator.id] = token
        # One more account for the in-process service baseline.
        annotator, _token = accounts.create_account(
            session=session, name="sim-service", role=Role.annotator, token_ttl=timedelta(days=1))
    batch = 500
    for start in range(0, tasks, batch):
        with db.write() as session:
            for i in range(start, min(tasks, start + batch)):
                prompt = repo.get_or_create_prompt(
                    session=session, content=f"Prompt {i % 50}: explain item {i % 50}.")
                assert prompt.id is not None
                ids = []
                for side in ("left", "right"):
                    completion = repo.get_or_create_completion(
                        session=session, prompt_id=prompt.id, origin="external:bench",
                        content=f"Answer {side} for task {i}: " + "lorem ipsum " * 20)
                    assert completion.id is not None
                    ids.append(completion.id)
                repo.get_or_create_task(session=session, kind=TaskKind.pairwise,
                                        prompt_id=prompt.id, completion_ids=ids)
            assignment.sync_queue(session=session)
    return tokens


# ---------------------------------------------------------------------------------------------
# The server


class Server:
    """`prefloop up` as a child process (so it can be SIGKILLed)."""

    def __init__(self, db_url: str, port: int, log: Path, env: dict[str, str],
                 workers: int = 1):
        self.db_url, self.port, self.log, self.env = db_url, port, log, env
        self.workers = workers
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> float:
        started = time.monotonic()
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / "cli.py"), "--db", self.db_url, "up", "--host",
                 "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
                 "--workers", str(self.workers)],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
                cwd=ROOT, start_new_session=True)
        deadline = started + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prefloop up exited with {self.process.returncode}; "
                                   f"see {self.log}")
            try:
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("prefloop up did not become ready")

    def cpu_seconds(self) -> float:
        """User + system CPU of every live process in the server's process group (Linux)."""
        if self.process is None:
            return 0.0
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:
                continue
            # fields[2] is the process group; [11], [12] are utime, stime in clock ticks.
            if int(fields[2]) == self.process.pid:
                total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def kill(self) -> None:
        """SIGKILL the server and its worker processes (its own process group)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


# ---------------------------------------------------------------------------------------------
# Simulated annotators


@dataclass
class Tally:
    # (annotator, idempotency key, task, label id) of every acknowledged submit
    acked: list[tuple[int, str, int, int]] = field(default_factory=list)
    submit_latency: list[tuple[float, float]] = field(default_factory=list)  # (start, seconds)
    next_latency: list[tuple[float, float]] = field(default_factory=list)
    http_5xx: int = 0
    http_429: int = 0
    other_4xx: Counter[int] = field(default_factory=Counter)
    connect_errors: int = 0
    gave_up: int = 0
    errors: list[str] = field(default_factory=list)


async def _backoff(attempt: int) -> None:
    await asyncio.sleep(min(2.0, 0.05 * 2 ** attempt) * random.uniform(0.5, 1.5))


async def simulate(annotator_id: int, token: str, client: RawClient, cfg: LoadConfig,
                   deadline: float, tally: Tally) -> None:
    rng = random.Random(annotator_id)
    headers = {"Authorization": f"Bearer {token}"}
    while time.monotonic() < deadline:
        task = None
        for attempt in range(cfg.submit_attempts):
            started = time.perf_counter()
            try:
                response = await client.request("GET", "/api/tasks/next?kind=pairwise",
                                                headers)
            except TransportError:
                tally.connect_errors += 1
                await _backoff(attempt)
                continue
            if response.status_code >= 500:
                tally.http_5xx += 1
                await _backoff(attempt)
                continue
            if response.status_code != 200:
                tally.other_4xx[response.status_code] += 1
                tally.errors.append(f"GET next {response.status_code}: {response.text[:200]}")
                await _backoff(attempt)
                continue
            tally.next_latency.append((started, time.perf_counter() - started))
            task = response.json()["task"]
            break
        if task is None:
            return  # queue empty (or the server never came back)
        await asyncio.sleep(rng.uniform(0, cfg.think_max_s))
        key = uuid.uuid4().hex
        body = {"choice": rng.choice(CHOICES)}
        for attempt in range(cfg.submit_attempts):
            started = time.perf_counter()
            try:
                response = await client.request(
                    "POST", f"/api/tasks/{task['task_id']}/labels",
                    {**headers, "Idempotency-Key": key}, body)
            except TransportError:
                tally.connect_errors += 1
                await _backoff(attempt)
                continue
            elapsed = time.perf_counter() - started
            if response.status_code >= 500:
                tally.http_5xx += 1
                await _backoff(attempt)
                continue
            if response.status_code == 429:
                tally.http_429 += 1
                await asyncio.sleep(float(response.headers.get("retry-after", "1")))
                continue
            if response.status_code in (200, 201):
                tally.submit_latency.append((started, elapsed))
                tally.acked.append((annotator_id, key, task["task_id"],
                                    response.json()["label_id"]))
            else:
                tally.other_4xx[response.status_code] += 1
                tally.errors.append(f"POST label {response.status_code}: {response.text[:200]}")
            break
        else:
            tally.gave_up += 1


async def drive(cfg: LoadConfig, server: Server, tokens: dict[int, str],
                restarts: list[float]) -> tuple[Tally, float, float]:
    tally = Tally()
    started = time.monotonic()
    deadline = started + cfg.duration_s

    async def chaos() -> None:
        for k in range(cfg.kills):
            await asyncio.sleep(started + cfg.duration_s * (k + 1) / (cfg.kills + 1)
                                - time.monotonic())
            server.kill()
            restarts.append(await asyncio.to_thread(server.start))

    simulated = list(tokens.items())[: cfg.annotators]
    clients = [RawClient("127.0.0.1", server.port) for _ in simulated]
    try:
        await asyncio.gather(chaos(), *(simulate(a, t, client, cfg, deadline, tally)
                                        for (a, t), client in zip(simulated, clients,
                                                                  strict=True)))
    finally:
        for client in clients:
            await client.close()
    return tally, started, time.monotonic()


# ---------------------------------------------------------------------------------------------
# Checking the store against the acknowledgements


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def verify(db: Database, tally: Tally, annotator_ids: set[int], results: Results) -> None:
    from sqlmodel import col, select

    with db.read() as session:
        stored = session.exec(select(Label).where(col(Label.annotator_id).in_(annotator_ids))
                              ).all()
        per_task = session.exec(text(
            "select count(*) from (select task_id from label group by task_id "
            "having count(*) > 1) t")).one()[0]  # type: ignore[call-overload]
        dup_pairs = session.exec(text(
            "select count(*) from (select task_id, annotator_id from label group by 1, 2 "
            "having count(*) > 1) t")).one()[0]  # type: ignore[call-overload]
        if db.is_sqlite:
            check = session.exec(text("pragma integrity_check")).all()  # type: ignore[call-overload]
            fk = session.exec(text("pragma foreign_key_check")).all()  # type: ignore[call-overload]
            results.integrity = (f"integrity_check {check[0][0]}, "
                                 f"foreign_key_check {len(fk)} rows")
        else:
            orphans = session.exec(text(
                "select count(*) from label l left join task t on t.id = l.task_id "
                "where t.id is null")).one()[0]  # type: ignore[call-overload]
            results.integrity = f"constraints hold; {orphans} orphan labels"
    by_key = Counter((label.annotator_id, label.idempotency_key) for label in stored)
    stored_ids = {(label.annotator_id, label.idempotency_key): label.id for label in stored}
    acked_keys = {(a, key) for a, key, _task, _label in tally.acked}
    results.acked = len(tally.acked)
    results.lost = sum(1 for a, key, _t, _l in tally.acked if (a, key) not in stored_ids)
    results.label_id_mismatch = sum(1 for a, key, _t, label_id in tally.acked
                                    if stored_ids.get((a, key)) not in (None, label_id))
    results.duplicated = sum(n - 1 for n in by_key.values() if n > 1) + int(dup_pairs) + (
        len(tally.acked) - len(acked_keys))
    results.over_overlap = int(per_task)  # overlap is 1 here: two labels on a task is too many
    results.stored_not_acked = len(set(stored_ids) - acked_keys)


def store_only_baseline(db: Database, annotator_id: int, ops: int, results: Results) -> None:
    """The same next + submit, through the store in-process: no HTTP, no auth, no JSON."""
    latencies = []
    started = time.perf_counter()
    for i in range(ops):
        t0 = time.perf_counter()

        def work(session: Any, i: int = i) -> bool:
            offer = assignment.next_task(session=session, annotator_id=annotator_id,
                                         kind=TaskKind.pairwise, ttl=timedelta(minutes=10))
            if offer is None:
                return False
            assert offer.task.id is not None
            result = repo.submit_label(session=session, task_id=offer.task.id,
                                       annotator_id=annotator_id,
                                       value={"choice": CHOICES[i % 4]},
                                       shown_order=offer.lease.shown_order,
                                       idempotency_key=f"baseline-{i}")
            assignment.mark_submitted(session=session, lease=offer.lease)
            return result is not None

        if not db.run_write(work):
            break
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    if latencies:
        results.store_only_p50_ms = 1000 * statistics.median(latencies)
        results.store_only_ops_per_s = len(latencies) / elapsed


def service_only_baseline(db: Database, annotator_id: int, ops: int, results: Results) -> None:
    """The server's next + submit (app.annotation), in-process: no HTTP, no auth, no JSON."""
    from app import annotation
    from app.schemas import LabelIn
    from app.settings import Settings

    settings = Settings()
    with db.read() as session:
        annotator = session.get(Annotator, annotator_id)
        assert annotator is not None
        user = annotation.User(id=annotator_id, name=annotator.name, role=Role.annotator,
                               token_id=0)
    latencies = []
    started = time.perf_counter()
    for i in range(ops):
        t0 = time.perf_counter()
        view = annotation.next_task(db, settings, user, TaskKind.pairwise)
        if view is None:
            break
        annotation.submit_label(db, user, view.task_id,
                                LabelIn.model_validate({"choice": CHOICES[i % 4]}),
                                idempotency_key=f"service-baseline-{i}")
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    if latencies:
        results.service_only_p50_ms = 1000 * statistics.median(latencies)
        results.service_only_ops_per_s = len(latencies) / elapsed


# ---------------------------------------------------------------------------------------------


def run(cfg: LoadConfig) -> Results:
    workdir = cfg.workdir or Path(tempfile.mkdtemp(prefix="prefloop-load-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tasks = cfg.tasks or max(500, int(cfg.annotators * cfg.duration_s
                                      * (6 if cfg.think_max_s == 0 else 2.5 / cfg.think_max_s)))
    results = Results(config={**asdict(cfg), "workdir": str(workdir), "tasks": tasks})
    db_url = fresh_database(cfg, workdir)
    db = Database.from_url(db_url, sqlite_synchronous=cfg.synchronous)
    server: Server | None = None
    try:
        tokens = seed(db, cfg.annotators, tasks)
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # Submits are rate limited per annotator; the stress run has no think time at all.
        env = {"PREFLOOP_SUBMIT_RATE_PER_S": "100", "PREFLOOP_SUBMIT_BURST": "100",
               "PREFLOOP_DATA_DIR": str(workdir),
               "PREFLOOP_SQLITE_SYNCHRONOUS": cfg.synchronous}
        server = Server(db_url, port, workdir / "server.log", env, cfg.workers)
        server.start()
        server_cpu, client_cpu = server.cpu_seconds(), time.process_time()
        tally, started, ended = asyncio.run(drive(cfg, server, tokens, results.restarts_s))
        results.load_average = os.getloadavg()
        if cfg.kills == 0 and tally.acked:
            results.server_cpu_ms_per_label = round(
                1000 * (server.cpu_seconds() - server_cpu) / len(tally.acked), 2)
            results.client_cpu_ms_per_label = round(
                1000 * (time.process_time() - client_cpu) / len(tally.acked), 2)
        server.stop()
        steady = [s for t0, s in tally.submit_latency if t0 - _perf_origin(started) >=
                  cfg.warmup_s]
        results.submit_p50_ms = _ms(_percentile(steady, 0.5))
        results.submit_p99_ms = _ms(_percentile(steady, 0.99))
        results.submit_max_ms = _ms(max(steady) if steady else None)
        nexts = [s for t0, s in tally.next_latency if t0 - _perf_origin(started) >= cfg.warmup_s]
        results.next_p50_ms = _ms(_percentile(nexts, 0.5))
        results.next_p99_ms = _ms(_percentile(nexts, 0.99))
        results.writes_per_s = len(tally.acked) / (ended - started)
        results.http_5xx, results.http_429 = tally.http_5xx, tally.http_429
        results.http_other_4xx = tally.other_4xx
        results.connect_errors, results.gave_up = tally.connect_errors, tally.gave_up
        results.first_errors = tally.errors[:5]
        verify(db, tally, set(list(tokens)[: cfg.annotators]), results)
        store_only_baseline(db, list(tokens)[-1], cfg.baseline_ops, results)
        service_only_baseline(db, max(tokens) + 1, cfg.baseline_ops, results)
        if results.store_only_p50_ms and results.submit_p50_ms:
            results.http_over_store_p50 = results.submit_p50_ms / results.store_only_p50_ms
        if results.service_only_p50_ms and results.submit_p50_ms:
            results.http_over_service_p50 = (results.submit_p50_ms
                                             / results.service_only_p50_ms)
    finally:
        if server is not None:
            server.stop()
        db.dispose()
        if not cfg.keep:
            drop_database(db_url)
    return results


_PERF_OFFSET = time.perf_counter() - time.monotonic()


def _perf_origin(monotonic_start: float) -> float:
    return monotonic_start + _PERF_OFFSET


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 2)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--annotators", type=int, default=50)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--think-max", type=float, default=2.0,
                        help="think time is uniform in [0, this] seconds; 0 = stress")
    parser.add_argument("--kills", type=int, default=0, help="SIGKILL + restart the server "
                        "this many times, evenly spaced")
    parser.add_argument("--synchronous", choices=["FULL", "NORMAL"], default="FULL",
                        help="SQLite: FULL (default) survives power loss, NORMAL only a crash")
    parser.add_argument("--workers", type=int, default=1, help="`prefloop up --workers`")
    parser.add_argument("--tasks", type=int, default=None)
    parser.add_argument("--warmup", type=float, default=5.0,
                        help="seconds excluded from the steady-state latency figures")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()
    cfg = LoadConfig(backend=args.backend, annotators=args.annotators,
                     duration_s=args.duration, think_max_s=args.think_max, kills=args.kills,
                     synchronous=args.synchronous, workers=args.workers,
                     tasks=args.tasks, warmup_s=args.warmup, workdir=args.workdir,
                     keep=args.keep)
    results = run(cfg)
    data = asdict(results)
    data["http_other_4xx"] = dict(results.http_other_4xx)
    print(json.dumps(data, indent=2, default=str))
    print()
    print("| backend | sync | workers | annotators | think | kills | acked | lost | dup | 5xx | "
          "writes/s | submit p50 / p99 / max ms | store-only p50 ms | HTTP/store p50 | integrity |")
    print(f"| {cfg.backend} | {cfg.synchronous if cfg.backend == 'sqlite' else '-'} | "
          f"{cfg.workers} | {cfg.annotators} | 0-{cfg.think_max_s:g} s | {cfg.kills} | "
          f"{results.acked} | {results.lost} | {results.duplicated + results.over_overlap} | "
          f"{results.http_5xx} | {results.writes_per_s:.1f} | {results.submit_p50_ms} / "
          f"{results.submit_p99_ms} / {results.submit_max_ms} | {_fmt(results.store_only_p50_ms)}"
          f" | {_fmt(results.http_over_store_p50)}x | {results.integrity} |")
    print(f"service-only (in-process app.annotation) p50 {_fmt(results.service_only_p50_ms)} ms, "
          f"{_fmt(results.service_only_ops_per_s)} next+submit/s")
    print(f"server CPU {results.server_cpu_ms_per_label} ms/label, load generator CPU "
          f"{results.client_cpu_ms_per_label} ms/label, load average at the end "
          f"{results.load_average}")
    if args.json:
        args.json.write_text(json.dumps(data, indent=2, default=str))


if __name__ == "__main__":
    main()
