"""Redeploy under load: switch time and failed requests while the served policy changes.

A live app (uvicorn in this process, SQLite store) serves /v1; `--clients` threads call it with
the `openai` client (no retries, half of them streaming) for `--steady-s` seconds (the
baseline), then the store's deployed version is changed `--redeploys` times by `promote` (each
a new version, so each is loaded cold beside the current one and smoke-tested) and once by
`rollback` (to the warm previous one). The app notices by polling, as `prefloop up` does.

Reported: switch time (store commit -> first answer from the new version; and the manager's own
load + smoke time), failed requests during the switches and overall, every answer checked to
come from exactly one version, and latency during switches beside the steady-state baseline.

    python benchmarks/deploy_switch.py                                  # tiny models, ~1 min
    python benchmarks/deploy_switch.py --model smollm2-135m-instruct --clients 4 --redeploys 3
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "Write a poem"


@dataclass
class Call:
    start: float
    end: float
    ok: bool
    model: str | None
    stream: bool
    error: str | None = None


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def _promote(session: Any, *, policy_id: int) -> Any:
    from store import deployments

    return deployments.promote(session, policy_id=policy_id, actor="bench")


def _versions(model: str, n: int, workdir: Path) -> list[tuple[str, str]]:
    """(name, weights) per version: tiny models with different seeds, or the same real model
    under different names (each still loaded cold when it is deployed)."""
    if model != "tiny":
        from training.models import resolve_model

        weights = resolve_model(model)
        return [(f"v{i + 1}", weights) for i in range(n)]
    from training.models import convert_bundled_tokenizer, load_tokenizer, save_tiny_model

    tokenizer = load_tokenizer(str(convert_bundled_tokenizer("smollm2-135m-instruct")))
    return [(f"v{i + 1}", str(save_tiny_model(workdir / f"v{i + 1}", tokenizer, seed=i)))
            for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny | a bundled name or model folder")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--redeploys", type=int, default=4)
    parser.add_argument("--steady-s", type=float, default=15.0)
    parser.add_argument("--settle-s", type=float, default=3.0,
                        help="Load kept on after each switch before the next one.")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--poll-s", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=None, help="Write the figures as JSON.")
    args = parser.parse_args()

    import uvicorn
    from openai import OpenAI
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from app.main import create_app
    from app.settings import Settings
    from store import accounts, deployments, migrate
    from store.db import Database
    from store.models import Role

    console = Console()
    workdir = Path(tempfile.mkdtemp(prefix="deploy-switch-"))
    db = Database.from_url(f"sqlite:///{workdir}/bench.db")
    migrate.upgrade(db.engine)
    _, token = db.run_write(lambda s: accounts.create_account(
        session=s, name="bench", role=Role.admin, token_ttl=timedelta(days=1)))
    versions = _versions(args.model, args.redeploys + 1, workdir)
    ids: list[int] = []
    for name, weights in versions:
        policy = db.run_write(functools.partial(
            deployments.register_policy, name=name, base_model=args.model, weights_uri=weights))
        assert policy.id is not None
        ids.append(policy.id)
    first = ids[0]
    db.run_write(lambda s: deployments.promote(s, policy_id=first, actor="bench"))

    settings = Settings(data_dir=workdir, serving_poll_interval_s=args.poll_s,
                        serving_max_queue=max(32, args.clients * 2))
    app = create_app(settings, db=db)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    manager = app.state.deployments
    while not manager.models():
        time.sleep(0.1)
    base_url = f"http://127.0.0.1:{port}/v1"

    # Each version's greedy answer, to check that every response came from one version.
    reference = OpenAI(base_url=base_url, api_key=token, max_retries=0)
    expected: dict[str, set[str]] = {}

    calls: list[Call] = []
    stop = threading.Event()
    wrong: list[str] = []

    def client_loop(i: int) -> None:
        client = OpenAI(base_url=base_url, api_key=token, max_retries=0, timeout=300)
        stream = i % 2 == 1
        while not stop.is_set():
            started = time.monotonic()
            try:
                if stream:
                    chunks = list(client.completions.create(
                        model="deployed", prompt=PROMPT, max_tokens=args.max_tokens,
                        temperature=0, stream=True))
                    models = {c.model for c in chunks}
                    text = "".join(c.choices[0].text for c in chunks)
                    model = models.pop() if len(models) == 1 else f"mixed:{sorted(models)}"
                else:
                    r = client.completions.create(model="deployed", prompt=PROMPT,
                                                  max_tokens=args.max_tokens, temperature=0)
                    model, text = r.model, r.choices[0].text
                calls.append(Call(started, time.monotonic(), True, model, stream))
                answers = expected.setdefault(model, set())
                answers.add(text)
                if len(answers) > 1:
                    wrong.append(f"{model}: {len(answers)} different greedy answers")
            except Exception as exc:  # counted as a failed request
                calls.append(Call(started, time.monotonic(), False, None, stream,
                                  f"{type(exc).__name__}: {exc}"))

    reference.completions.create(model="deployed", prompt=PROMPT, max_tokens=2)  # warm up
    workers = [threading.Thread(target=client_loop, args=(i,), daemon=True)
               for i in range(args.clients)]
    for w in workers:
        w.start()
    steady_from = time.monotonic()
    console.print(f"steady state: {args.clients} clients for {args.steady_s:g} s ...")
    time.sleep(args.steady_s)
    steady_to = time.monotonic()

    switches: list[dict[str, Any]] = []
    plan = [("promote", i) for i in range(1, args.redeploys + 1)] + [("rollback", None)]
    with Progress(console=console) as progress:
        task = progress.add_task("redeploys", total=len(plan))
        for change, index in plan:
            committed = time.monotonic()
            if change == "promote":
                assert index is not None
                target, policy_id = versions[index][0], ids[index]
                db.run_write(functools.partial(_promote, policy_id=policy_id))
            else:
                target = db.run_write(lambda s: deployments.rollback(s, actor="bench")).name
            while not any(c.ok and c.model == target and c.start >= committed for c in calls):
                time.sleep(0.01)
            served = min(c.end for c in calls if c.ok and c.model == target
                         and c.start >= committed)
            switch = manager.status.last_switch
            time.sleep(args.settle_s)
            switches.append({"change": change, "to": target, "warm": switch.warm,
                             "from_commit_s": served - committed, "load_s": switch.load_s,
                             "smoke_s": switch.smoke_s, "window": (committed, time.monotonic())})
            progress.advance(task)
    stop.set()
    for w in workers:
        w.join(timeout=300)
    server.should_exit = True
    thread.join(timeout=30)

    def in_windows(c: Call) -> bool:
        return any(lo <= c.start <= hi or lo <= c.end <= hi
                   for lo, hi in (s["window"] for s in switches))

    steady = [c for c in calls if steady_from <= c.start and c.end <= steady_to]
    during = [c for c in calls if in_windows(c)]
    cold = [s for s in switches if not s["warm"]]
    warm = [s for s in switches if s["warm"]]
    figures = {
        "model": args.model, "clients": args.clients, "max_tokens": args.max_tokens,
        "poll_s": args.poll_s, "redeploys": len(cold), "rollbacks": len(warm),
        "requests_total": len(calls),
        "failed_total": sum(not c.ok for c in calls),
        "failed_during_switches": sum(not c.ok for c in during),
        "requests_during_switches": len(during),
        "answers_not_from_one_version": len(wrong)
        + sum(1 for c in calls if c.model and c.model.startswith("mixed")),
        "cold_switch_from_commit_s_p50": _pct([s["from_commit_s"] for s in cold], 0.5),
        "cold_switch_from_commit_s_max": max((s["from_commit_s"] for s in cold), default=0),
        "cold_load_s_p50": _pct([s["load_s"] for s in cold], 0.5),
        "cold_smoke_s_p50": _pct([s["smoke_s"] for s in cold], 0.5),
        "rollback_from_commit_s": [round(s["from_commit_s"], 3) for s in warm],
        "steady_latency_s_p50": _pct([c.end - c.start for c in steady if c.ok], 0.5),
        "steady_latency_s_p99": _pct([c.end - c.start for c in steady if c.ok], 0.99),
        "steady_rps": len(steady) / max(1e-9, steady_to - steady_from),
        "switch_latency_s_p50": _pct([c.end - c.start for c in during if c.ok], 0.5),
        "switch_latency_s_p99": _pct([c.end - c.start for c in during if c.ok], 0.99),
        "errors": sorted({c.error or "" for c in calls if not c.ok})[:5],
    }
    table = Table(title=f"redeploy under load ({args.model}, {args.clients} clients, "
                  f"{args.max_tokens} tokens, poll {args.poll_s:g} s)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in figures.items():
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    console.print(table)
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))
    db.dispose()


if __name__ == "__main__":
    main()
