"""Label writes/s and latency of the store alone, on SQLite and PostgreSQL, against a baseline.

    python benchmarks/store_writes.py                   # both databases, 8 writer threads, 10 s
    python benchmarks/store_writes.py --threads 20 --seconds 20 --backends sqlite

Each writer thread submits labels through the real write path (`Database.run_write` +
`repo.submit_label`: validation, idempotency lookup, the label row, its audit row, one
transaction). The baseline, in the same run and on the same database, is the floor: the raw
driver inserting an equivalent row into a table with the same unique keys, one transaction per
insert, the same threads and the same transaction mode (BEGIN IMMEDIATE on SQLite). The ratio
says what the store's checks and audit trail cost over that floor.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import create_engine, text

from store import migrate, repo
from store.db import Database, make_engine, normalise_url
from store.models import AnnotatorKind

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def hammer(write_one: Callable[[int, int], None], threads: int, seconds: float) -> dict:
    """Run `write_one(thread, i)` in a loop on each thread; collect per-write latencies."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []
    deadline = time.perf_counter() + seconds

    def loop(index: int) -> None:
        i = 0
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            try:
                write_one(index, i)
            except BaseException as exc:  # report, don't hide
                errors.append(exc)
                return
            latencies[index].append(time.perf_counter() - start)
            i += 1

    workers = [threading.Thread(target=loop, args=(t,)) for t in range(threads)]
    began = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - began
    flat = [x for per in latencies for x in per]
    if errors:
        raise RuntimeError(f"{len(errors)} writes failed; first: {errors[0]!r}")
    return {"writes": len(flat), "per_s": len(flat) / elapsed,
            "p50_ms": 1000 * statistics.median(flat), "p99_ms": 1000 * percentile(flat, 0.99)}


def store_run(db: Database, threads: int, seconds: float) -> dict:
    """Through the store: one task per write so every submit creates a label."""
    n_tasks = 200_000
    with db.write() as s:
        prompt = repo.get_or_create_prompt(session=s, content="benchmark prompt")
        ids = [repo.get_or_create_completion(session=s, prompt_id=prompt.id or 0,
                                             content=f"answer {i}", origin="bench").id or 0
               for i in range(2)]
        annotators = [repo.get_or_create_annotator(session=s, name=f"bench-{t}",
                                                   kind=AnnotatorKind.human).id or 0
                      for t in range(threads)]
    # Tasks are cheap to pre-create in bulk with the driver; the measured part is the submit.
    first_task = _bulk_tasks(db, prompt.id or 0, ids, n_tasks)

    def write_one(thread: int, i: int) -> None:
        task_id = first_task + (i * threads + thread) % n_tasks
        db.run_write(lambda s: repo.submit_label(
            session=s, task_id=task_id, annotator_id=annotators[thread],
            value={"choice": "a" if i % 2 else "b"}, idempotency_key=f"{thread}-{i}"))

    return hammer(write_one, threads, seconds)


def _bulk_tasks(db: Database, prompt_id: int, completion_ids: list[int], n: int) -> int:
    with db.engine.begin() as c:
        start = c.execute(text("SELECT COALESCE(MAX(id), 0) + 1 FROM task")).scalar_one()
        c.execute(
            text("INSERT INTO task (id, task_key, kind, prompt_id, overlap, priority, created_at)"
                 " VALUES (:id, :key, 'pairwise', :p, 1, 0, CURRENT_TIMESTAMP)"),
            [{"id": start + i, "key": uuid.uuid4().hex, "p": prompt_id} for i in range(n)],
        )
        c.execute(
            text("INSERT INTO task_item (task_id, position, completion_id) VALUES (:t, :pos, :c)"),
            [{"t": start + i, "pos": pos, "c": cid} for i in range(n)
             for pos, cid in enumerate(completion_ids)],
        )
    return int(start)


def raw_run(url: str, threads: int, seconds: float) -> dict:
    """The floor: the driver inserting into a bare table with the same unique keys."""
    engine = make_engine(url)
    with engine.begin() as c:
        c.execute(text("DROP TABLE IF EXISTS raw_label"))
        c.execute(text(
            "CREATE TABLE raw_label (id INTEGER PRIMARY KEY, task_id INTEGER NOT NULL, "
            "annotator_id INTEGER NOT NULL, choice VARCHAR(16), idempotency_key VARCHAR(200), "
            "UNIQUE (task_id, annotator_id), UNIQUE (annotator_id, idempotency_key))"
            if engine.dialect.name == "sqlite" else
            "CREATE TABLE raw_label (id SERIAL PRIMARY KEY, task_id INTEGER NOT NULL, "
            "annotator_id INTEGER NOT NULL, choice VARCHAR(16), idempotency_key VARCHAR(200), "
            "UNIQUE (task_id, annotator_id), UNIQUE (annotator_id, idempotency_key))"))
    write_engine = engine.execution_options(prefloop_write=True)

    def write_one(thread: int, i: int) -> None:
        with write_engine.begin() as c:
            c.execute(text("INSERT INTO raw_label (task_id, annotator_id, choice, idempotency_key)"
                           " VALUES (:t, :a, :c, :k)"),
                      {"t": i, "a": thread, "c": "a", "k": f"{thread}-{i}"})

    try:
        return hammer(write_one, threads, seconds)
    finally:
        engine.dispose()


def fresh_database(backend: str, workdir: Path) -> tuple[str, Callable[[], None]]:
    if backend == "sqlite":
        return f"sqlite:///{workdir / 'bench.db'}", lambda: None
    name = f"prefloop_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(normalise_url(PG_ADMIN_URL), isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}", drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"])
    args = parser.parse_args()
    print(f"{args.threads} writer threads, {args.seconds:.0f} s per run\n")
    header = f"{'database':<11} {'path':<22} {'writes':>7} {'writes/s':>9} {'p50 ms':>8} " \
             f"{'p99 ms':>8}"
    print(header)
    print("-" * len(header))
    for backend in args.backends:
        with tempfile.TemporaryDirectory() as tmp:
            url, drop = fresh_database(backend, Path(tmp))
            try:
                db = Database.from_url(url)
                migrate.upgrade(db.engine)
                results = {"store (submit_label)": store_run(db, args.threads, args.seconds),
                           "raw driver insert": raw_run(url, args.threads, args.seconds)}
                db.dispose()
            finally:
                drop()
        for name, r in results.items():
            print(f"{backend:<11} {name:<22} {r['writes']:>7} {r['per_s']:>9.0f} "
                  f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}")
        ratio = results["store (submit_label)"]["per_s"] / results["raw driver insert"]["per_s"]
        print(f"{backend:<11} {'store / raw':<22} {'':>7} {ratio:>9.2f}\n")


if __name__ == "__main__":
    main()
