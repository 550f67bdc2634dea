"""Export rows/s of `prefloop export`'s writer, chunked with a progress callback, against the
same export read in one chunk without one (how exports read before the progress bar), on SQLite
and PostgreSQL, in the same run and on the same store.

    python benchmarks/export_rows.py                        # 50k pairwise tasks, both databases
    python benchmarks/export_rows.py --tasks 80000 --backends postgresql

The store is filled once per database through `prefloop import`'s path (half text, half chat
prompts, so the export also converts rows to one shape). Each variant exports the same rows
(asserted: same sha256) `--repeats` times, interleaved; the best time is reported. On
PostgreSQL an export read in one chunk binds one parameter per task and fails past 65535 tasks
(psycopg 3 binds server-side); the chunked export has no such limit, which `--tasks 80000`
shows.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import create_engine, text

import store.exporting as exporting
from store import migrate
from store.db import Database, normalise_url
from store.importing import import_jsonl

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"


def write_input(path: Path, tasks: int) -> Path:
    with path.open("w") as handle:
        for i in range(tasks):
            prompt: object = f"Question {i}?"
            chosen: object = f"A good answer {i}."
            rejected: object = f"A bad answer {i}."
            if i % 2:
                prompt = [{"role": "user", "content": prompt}]
                chosen = [{"role": "assistant", "content": chosen}]
                rejected = [{"role": "assistant", "content": rejected}]
            handle.write(json.dumps({"prompt": prompt, "chosen": chosen,
                                     "rejected": rejected}) + "\n")
    return path


def timed_export(db: Database, out: Path, chunk: int, progress: bool) -> tuple[float, str]:
    events = []
    exporting.LOAD_CHUNK = chunk
    start = time.perf_counter()
    result = exporting.export_jsonl(
        db, format="trl-preference", out=out,
        on_progress=(lambda *event: events.append(event)) if progress else None)
    elapsed = time.perf_counter() - start
    if progress:
        assert events[-1] == ("writing", result.rows, result.rows), events[-1]
    return elapsed, result.sha256


def bench(db: Database, workdir: Path, tasks: int, repeats: int) -> None:
    source = write_input(workdir / "in.jsonl", tasks)
    start = time.perf_counter()
    import_jsonl(db, source, format="pairwise", source="bench")
    print(f"  filled: {tasks} pairwise tasks in {time.perf_counter() - start:.1f} s")
    default_chunk = exporting.LOAD_CHUNK
    variants = {"one chunk, no callback (baseline)": (10**9, False),
                f"chunks of {default_chunk} + progress callback": (default_chunk, True)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    failed: set[str] = set()
    digests = set()
    # Interleaved repeats, so drift in a shared machine's load hits both variants alike.
    for _ in range(repeats):
        for name, (chunk, progress) in variants.items():
            if name in failed:
                continue
            try:
                elapsed, digest = timed_export(db, workdir / "out.jsonl", chunk, progress)
            except Exception as exc:  # the one-chunk read past PostgreSQL's parameter limit
                print(f"  {name:42s} failed: {type(exc).__name__}: {str(exc)[:90]}")
                failed.add(name)
                continue
            times[name].append(elapsed)
            digests.add(digest)
    best = {name: min(values) for name, values in times.items() if values}
    for name, seconds in best.items():
        print(f"  {name:42s} {tasks / seconds:9,.0f} tasks/s  (best of {len(times[name])}: "
              f"{seconds:.2f} s)")
    exporting.LOAD_CHUNK = default_chunk
    assert len(digests) == 1, "the variants exported different bytes"
    if len(best) == 2:
        baseline, chunked = best.values()
        print(f"  chunked+progress / baseline time: {chunked / baseline:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"],
                        choices=["sqlite", "postgresql"])
    args = parser.parse_args()
    for backend in args.backends:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            print(f"{backend}:")
            if backend == "sqlite":
                db = Database.from_url(f"sqlite:///{workdir / 'bench.db'}")
                migrate.upgrade(db.engine)
                bench(db, workdir, args.tasks, args.repeats)
                continue
            name = f"prefloop_bench_{uuid.uuid4().hex[:8]}"
            admin = create_engine(normalise_url(PG_ADMIN_URL), isolation_level="AUTOCOMMIT")
            with admin.connect() as connection:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
            try:
                db = Database.from_url(PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}")
                migrate.upgrade(db.engine)
                bench(db, workdir, args.tasks, args.repeats)
                db.engine.dispose()
            finally:
                with admin.connect() as connection:
                    connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
                admin.dispose()


if __name__ == "__main__":
    main()
