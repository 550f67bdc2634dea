"""`prefloop import` rows/s next to the raw driver and the old per-row path, in one run (SQLite).

    python benchmarks/import_rows.py                       # 50,000 pairwise rows
    python benchmarks/import_rows.py --rows 20000 --old-rows 1000

Every figure is measured in this run, on this machine, on a fresh migrated SQLite file with the
store's settings (WAL, synchronous=FULL), from the same generated file of pairwise rows (each a
new prompt with two completions, so each row writes a prompt, two completions, a task, two task
items, a label and its audit event):

- `prefloop import (CLI)`: the real command in its own process, start-up and the progress
  bar's line count included;
- `import_jsonl (in process)`: the function that command calls, without the start-up;
- `raw driver`: sqlite3 `executemany` of exactly the rows the import stored (read back from
  its database, so the same values, ids and sizes) into the same tables, one transaction: the
  floor no checks, hashing or JSON parsing at all;
- `old per-row path`: store/importing.py as of commit OLD_COMMIT (one savepoint and a handful
  of statements per row through store/repo.py), loaded from git, on the first `--old-rows`
  rows (it runs at a few hundred rows/s, so the full file would take minutes).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from store import migrate  # noqa: E402
from store.db import Database  # noqa: E402

OLD_COMMIT = "f7f5922"  # the last commit with the per-row import
TABLES = ("annotator", "prompt", "completion", "task", "task_item", "label", "audit_event")


def write_rows(path: Path, n: int) -> Path:
    with path.open("w") as handle:
        for i in range(n):
            handle.write(json.dumps({
                "prompt": f"Question {i}: in two sentences, what does item {i} of the list do?",
                "chosen": f"Item {i} keeps the records in order. " * 4,
                "rejected": f"Item {i} is a thing. " * 3}) + "\n")
    return path


def fresh_store(path: Path) -> str:
    url = f"sqlite:///{path}"
    db = Database.from_url(url)
    migrate.upgrade(db.engine)
    db.dispose()
    return url


def rate(rows: int, seconds: float) -> str:
    return f"{rows / seconds:10,.0f} rows/s  ({rows:,} rows in {seconds:.2f} s)"


def time_cli(url: str, data: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), "--db", url, "import",
                           str(data), "--format", "pairwise"], capture_output=True, text=True,
                          cwd=ROOT, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"prefloop import failed:\n{done.stdout}{done.stderr}")
    return seconds


def time_in_process(module: ModuleType, url: str, data: Path) -> float:
    db = Database.from_url(url)
    try:
        start = time.perf_counter()
        report = module.import_jsonl(db, data, format="pairwise")
        seconds = time.perf_counter() - start
    finally:
        db.dispose()
    assert report.errors == [], report.errors[:3]
    return seconds


def time_raw_driver(source_db: Path, target_db: Path) -> tuple[int, float]:
    """executemany of the rows `source_db` holds into the same, empty tables of `target_db`."""
    with sqlite3.connect(source_db) as source:
        tables = {t: (
            [c[1] for c in source.execute(f"PRAGMA table_info({t})")],
            source.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall()) for t in TABLES}
    target = sqlite3.connect(target_db, isolation_level=None)
    for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON"):
        target.execute(f"PRAGMA {pragma}")
    start = time.perf_counter()
    target.execute("BEGIN IMMEDIATE")
    for table, (columns, rows) in tables.items():
        target.executemany(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
            f"({', '.join('?' for _ in columns)})", rows)
    target.execute("COMMIT")
    seconds = time.perf_counter() - start
    target.close()
    return len(tables["label"][1]), seconds


def old_importing() -> ModuleType | None:
    """store/importing.py at OLD_COMMIT, or None without that git history."""
    try:
        text = subprocess.run(["git", "show", f"{OLD_COMMIT}:store/importing.py"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    spec = importlib.util.spec_from_loader("old_importing", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_importing"] = module  # dataclasses look their module up there
    exec(compile(text, f"{OLD_COMMIT}:store/importing.py", "exec"), module.__dict__)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--old-rows", type=int, default=2_000,
                        help="rows for the old per-row path (0: skip it)")
    args = parser.parse_args()
    from store import importing

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_rows(work / "rows.jsonl", args.rows)
        print(f"{args.rows:,} pairwise rows, SQLite, Python {sys.version.split()[0]}, "
              f"sqlite {sqlite3.sqlite_version}")
        cli_seconds = time_cli(fresh_store(work / "cli.db"), data)
        in_process = time_in_process(importing, fresh_store(work / "inproc.db"), data)
        fresh_store(work / "raw.db")
        raw_rows, raw_seconds = time_raw_driver(work / "cli.db", work / "raw.db")
        assert raw_rows == args.rows
        print(f"  prefloop import (CLI)      {rate(args.rows, cli_seconds)}")
        print(f"  import_jsonl (in process)  {rate(args.rows, in_process)}")
        print(f"  raw driver (executemany)   {rate(raw_rows, raw_seconds)}")
        old = old_importing() if args.old_rows else None
        if old is None:
            print("  old per-row path           not run (--old-rows 0, or no git history at "
                  f"{OLD_COMMIT})")
            return
        subset = work / "subset.jsonl"
        subset.write_text("".join(data.read_text().splitlines(keepends=True)[:args.old_rows]))
        old_seconds = time_in_process(old, fresh_store(work / "old.db"), subset)
        print(f"  old per-row path           {rate(args.old_rows, old_seconds)}")
        old_rate = args.old_rows / old_seconds
        print(f"  CLI vs old per-row path: {args.rows / cli_seconds / old_rate:.1f}x; "
              f"in process vs old: {args.rows / in_process / old_rate:.1f}x; "
              f"raw driver vs in process: {in_process / raw_seconds:.1f}x faster")


if __name__ == "__main__":
    main()
