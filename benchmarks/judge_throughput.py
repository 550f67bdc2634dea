"""Judge batch-labeling throughput versus concurrency, against an endpoint of fixed latency.

    python benchmarks/judge_throughput.py --latency 0.2 --concurrency 1,4,16,64 --seconds 6

Starts the fault-injecting OpenAI-compatible server (tests/feedback/fault_server.py) in its own
process with a fixed per-request latency, imports pairwise tasks into a fresh SQLite store, and
runs the real batch labeler (feedback/batch.py: openai client, semaphore, rate limiter, writer)
at each concurrency. An ideal client keeps `concurrency` requests in flight all the time, so it
makes concurrency / latency requests per second; the table prints the measured rate next to that
ideal, in the same run, as a ratio. Pairwise labels take two requests (both orders), so labels/s
is half the request rate. `ratio` is over the labeling window (first request sent -> last label
committed); `run ratio` over the whole run, including loading the tasks and creating the
clients. `openai` is imported before the first level, as in any long-lived labeler process.
`client CPU ms/req` is the labeler's own CPU time per request (the server runs in another
process): at high concurrency on a small machine, client + server CPU is the ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from feedback.batch import BatchRunner  # noqa: E402
from feedback.config import LLMJudgeConfig, RunLimits  # noqa: E402
from feedback.rubric import load_rubric  # noqa: E402
from store import migrate, repo  # noqa: E402
from store.db import Database  # noqa: E402
from store.models import TaskKind  # noqa: E402


def _recorder(starts: list[float]) -> Callable[[float, float], None]:
    """An `on_call` hook that keeps each attempt's start time."""
    return lambda start, _end: starts.append(start)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server(latency: float) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.feedback.fault_server", "--port", str(port),
         "--latency", str(latency)], cwd=ROOT, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{url}/models", timeout=1).read()
            return proc, url
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the benchmark server did not start")


def _make_tasks(db: Database, n: int, tag: str) -> None:
    with db.write() as session:
        for i in range(n):
            prompt = repo.get_or_create_prompt(session=session, content=f"{tag} question {i}")
            ids = [repo.get_or_create_completion(
                session=session, prompt_id=prompt.id or 0, content=f"answer {j} quality={q}",
                origin="external:bench").id or 0 for j, q in enumerate((9 - i % 3, 3))]
            repo.get_or_create_task(session=session, kind=TaskKind.pairwise,
                                    prompt_id=prompt.id or 0, completion_ids=ids)


def run(latency: float, levels: list[int], seconds: float) -> list[dict[str, float]]:
    proc, url = _start_server(latency)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for concurrency in levels:
                db = Database.from_url(f"sqlite:///{tmp}/bench_{concurrency}.db")
                migrate.upgrade(db.engine)
                ideal_rps = concurrency / latency
                n_tasks = max(8, int(ideal_rps * seconds / 2))
                _make_tasks(db, n_tasks, f"c{concurrency}")
                config = LLMJudgeConfig(
                    model="bench", rubric=load_rubric("default_v1"), base_url=url,
                    limits=RunLimits(concurrency=concurrency, rate_limit_rps=100_000,
                                     timeout_s=30, max_retries=2, write_batch=100))
                starts: list[float] = []
                cpu_before = time.process_time()
                started = time.monotonic()
                stats = asyncio.run(BatchRunner(
                    db, config, on_call=_recorder(starts)).run())
                ended = started + stats.elapsed_s
                client_cpu = time.process_time() - cpu_before
                db.dispose()
                assert stats.written == n_tasks and stats.invalid == 0, stats
                window = ended - min(starts)
                rps = stats.requests / window
                rows.append({
                    "concurrency": concurrency, "latency_s": latency, "tasks": n_tasks,
                    "requests": stats.requests, "window_s": window, "elapsed_s": stats.elapsed_s,
                    "requests_per_s": rps, "ideal_requests_per_s": ideal_rps,
                    "ratio": rps / ideal_rps,
                    "run_ratio": stats.requests / stats.elapsed_s / ideal_rps,
                    "labels_per_s": stats.written / window, "ideal_labels_per_s": ideal_rps / 2,
                    "client_cpu_ms_per_request": 1000 * client_cpu / stats.requests,
                })
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.2, help="server latency, seconds")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--seconds", type=float, default=6.0,
                        help="ideal duration of each level (sets the number of tasks)")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()
    import openai  # noqa: F401  (a one-off process start-up cost, not part of any level)

    rows = run(args.latency, [int(c) for c in args.concurrency.split(",")], args.seconds)
    print(f"judge throughput, pairwise (2 requests per label), server latency "
          f"{args.latency * 1000:.0f} ms, {os.cpu_count()} CPUs")
    print(f"{'conc':>5} {'tasks':>6} {'req':>6} {'window s':>8} {'req/s':>8} {'ideal':>8} "
          f"{'ratio':>6} {'labels/s':>9} {'ideal':>7} {'run s':>6} {'run ratio':>9} "
          f"{'client CPU ms/req':>17}")
    for r in rows:
        print(f"{r['concurrency']:>5} {r['tasks']:>6} {r['requests']:>6} {r['window_s']:>8.2f} "
              f"{r['requests_per_s']:>8.1f} {r['ideal_requests_per_s']:>8.1f} "
              f"{r['ratio']:>6.2f} {r['labels_per_s']:>9.1f} {r['ideal_labels_per_s']:>7.1f} "
              f"{r['elapsed_s']:>6.2f} {r['run_ratio']:>9.2f} "
              f"{r['client_cpu_ms_per_request']:>17.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
