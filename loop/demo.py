"""`prefloop demo --rounds N`: the closed loop, headless, on the embedded default.

SQLite store, the bundled SmolLM2-135M-Instruct, the seeded arithmetic task (training/tasks.py),
a rule judge (format + accuracy, the signal) and an AI judge (the deployed policy itself, served
by the app's own OpenAI-compatible /v1 endpoint), local Ray. Each round: sample 4 answers to 48
new prompts from the deployed policy, label the pairs, export, DPO (LoRA) from the deployed
policy, evaluate candidate vs deployed on 64 held-out prompts, promote or reject. After each round
a table row (labels by source, win rate vs the previous policy, held-out reward, KL, wall time);
at the end a plot.

Why the app in-process for the AI judge: it is the same code path `prefloop up` serves (blue/green
switch to the promoted version included), so the demo exercises the loop as deployed, with no
second model server to keep in step. The app runs under uvicorn in a thread on a free loopback
port, with an API token of a local `demo-operator` account.

    prefloop demo --rounds 3
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from loop.config import RoundConfig
from loop.runner import RoundRunner
from loop.stages.judging import DEPLOYED_MODEL, JudgeEndpoint
from store import rounds as store_rounds
from store.db import Database
from store.rounds import RoundSummary

OPERATOR = "demo-operator"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class InProcessApp:
    """The prefloop app under uvicorn in a daemon thread (stop() shuts it down)."""

    base_url: str
    server: Any
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_app(db: Database, settings: Any, *, timeout_s: float = 60.0) -> InProcessApp:
    """Serve the app (with /v1 generation on) on a free loopback port; returns when it answers."""
    import uvicorn

    from app.main import create_app

    settings = settings.model_copy(update={"serving": "hf"})
    app = create_app(settings, db=db)  # no labeling UI: the demo only needs /v1
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, name="demo-app", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the in-process app did not start")
        time.sleep(0.05)
    return InProcessApp(f"http://127.0.0.1:{port}/v1", server, thread)


def operator_token(db: Database) -> str:
    """A fresh API token of the local demo account (created on first use)."""
    from sqlmodel import select

    from store import accounts
    from store.models import Annotator, Role

    def issue(session: Any) -> str:
        account = session.exec(select(Annotator).where(Annotator.name == OPERATOR)).first()
        if account is None:
            _, token = accounts.create_account(session=session, name=OPERATOR, role=Role.admin,
                                               token_ttl=timedelta(days=1))
            return str(token)
        token, _ = accounts.issue_token(session=session, annotator_id=account.id or 0,
                                        ttl=timedelta(days=1), name="demo")
        return str(token)

    return db.run_write(issue)


def wait_until_served(base_url: str, api_key: str, name: Callable[[], str], *,
                      timeout_s: float = 900.0) -> tuple[str, float]:
    """Wait until the app's /v1 serves the deployed version (`name()` reads it from the store
    on every poll: the app follows that row, and may refuse a version that fails its smoke
    generation and roll back); returns the name and the seconds waited.

    Why wait: the next round's AI judge asks for that version by name, and loading a model in
    this process while the app's loader thread loads one races inside transformers (its
    meta-device initialisation is process-global), so the two loads must not overlap.
    """
    import httpx

    started = time.monotonic()
    headers = {"Authorization": f"Bearer {api_key}"}
    while True:
        wanted = name()
        try:
            response = httpx.get(f"{base_url}/models", headers=headers, timeout=10)
            if response.status_code == 200 and any(
                    model.get("id") == wanted for model in response.json().get("data", [])[:1]):
                return wanted, time.monotonic() - started
        except httpx.HTTPError:
            pass
        if time.monotonic() - started > timeout_s:
            raise RuntimeError(f"the app did not switch to {wanted!r} within {timeout_s:g} s")
        time.sleep(0.5)


def _deployed_name(db: Database, config: RoundConfig) -> str:
    """Deploy the base model on a fresh store (as a round's collect would); the deployed name."""
    from training.models import resolve_model

    base_dir = resolve_model(config.base_model)
    return db.run_write(lambda s: store_rounds.ensure_deployed(
        s, base_model=config.base_model, weights_uri=base_dir, actor="demo").name)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ai_agreement(summary: RoundSummary) -> str:
    """The AI judge's agreement with the rule judge this round: all compared verdicts, and in
    brackets the ones where the rule judge picked a side (the AI judge never says tie)."""
    if not summary.ai_calibration:
        return "-"
    metrics = next(iter(summary.ai_calibration.values()))
    return (f"{_fmt(metrics.get('agreement'), 2)} of {metrics.get('n_compared', 0)} "
            f"({_fmt(metrics.get('agreement_decisive'), 2)} of {metrics.get('n_decisive', 0)})")


def round_row(summary: RoundSummary) -> dict[str, str]:
    labels = summary.labels
    return {
        "round": str(summary.id), "outcome": summary.state,
        "labels rule / ai (invalid) / human":
            f"{labels.get('rule', 0)} / {labels.get('ai', 0)} ({labels.get('ai_invalid', 0)})"
            f" / {labels.get('human', 0)}",
        "AI = rule (decisive)": _ai_agreement(summary),
        "routed to humans": "-" if summary.routed is None else str(summary.routed),
        "train pairs": str(summary.train_rows if summary.train_rows is not None else "-"),
        "win rate vs previous": _fmt(summary.win_rate),
        "held-out reward (previous -> candidate)":
            f"{_fmt(summary.reward_deployed)} -> {_fmt(summary.reward_candidate)}",
        "KL to base": _fmt(summary.kl, 2),
        "wall time": f"{summary.wall_s:.0f} s",
    }


def print_rows(rows: list[dict[str, str]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*row.values())
    console = Console()
    if not console.is_terminal:  # a log file or a pipe: keep each row on one line
        console = Console(width=200)
    console.print(table)


def deployed_rewards(summaries: list[RoundSummary]) -> list[float | None]:
    """Held-out reward of the deployed policy before round 1 and after each round."""
    if not summaries:
        return []
    rewards: list[float | None] = [summaries[0].reward_deployed]
    for s in summaries:
        current = rewards[-1]
        rewards.append(s.reward_candidate if s.state == "promoted" else current)
    return rewards


def plot_demo(summaries: list[RoundSummary], out: Path) -> Path:
    """Held-out reward of the deployed policy, win rate, KL and labels by source per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = [s.id for s in summaries]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    rewards = deployed_rewards(summaries)
    axes[0].plot(range(len(rewards)), [r if r is not None else float("nan") for r in rewards],
                 marker="o")
    axes[0].set_xticks(range(len(rewards)), ["start"] + [f"after r{i}" for i in ids])
    axes[0].set_title("held-out reward of the deployed policy")
    axes[0].set_ylim(0, 1)
    axes[1].plot(ids, [s.win_rate if s.win_rate is not None else float("nan")
                       for s in summaries], marker="o", label="win rate vs previous")
    axes[1].axhline(0.5, color="grey", lw=0.8, ls="--")
    ax_kl = axes[1].twinx()
    ax_kl.plot(ids, [s.kl if s.kl is not None else float("nan") for s in summaries],
               marker="s", color="tab:red", label="KL to base")
    axes[1].set_title("win rate (left) and KL to base, nats (right)")
    axes[1].set_xlabel("round")
    bottom = [0.0] * len(ids)
    for source in ("rule", "ai", "ai_invalid", "human"):
        counts = [float(s.labels.get(source, 0)) for s in summaries]
        axes[2].bar(ids, counts, bottom=bottom, label=source)
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    axes[2].set_title("labels by source")
    axes[2].set_xlabel("round")
    axes[2].legend(fontsize=8)
    for axis in axes[1:]:
        axis.set_xticks(ids)  # rounds are whole numbers
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@dataclass(frozen=True)
class DemoResult:
    summaries: list[RoundSummary]
    plot: Path
    wall_s: float


def run_demo(db: Database, config: RoundConfig, *, rounds: int, runs_dir: Path,
             settings: Any = None, ai_judge: bool = True,
             log: Callable[[str], None] = print) -> DemoResult:
    """Run `rounds` rounds (an unfinished one is finished first) and print a row after each."""
    started = time.perf_counter()
    server = None
    endpoint = None
    if ai_judge:
        from app.settings import get_settings

        settings = settings or get_settings()
        server = start_app(db, settings)
        endpoint = JudgeEndpoint(server.base_url, api_key=operator_token(db),
                                 model=DEPLOYED_MODEL)
        log(f"AI judge: the deployed policy at {server.base_url}")
        _deployed_name(db, config)
    else:
        config = _without_llm_judges(config)
    try:
        runner = RoundRunner(db, runs_dir=runs_dir, judge_endpoint=endpoint, log=log)
        done: list[RoundSummary] = []
        for index in range(rounds):
            if server is not None and endpoint is not None and endpoint.api_key:
                name, waited = wait_until_served(server.base_url, endpoint.api_key,
                                                 lambda: _deployed_name(db, config))
                log(f"the app serves {name!r} (waited {waited:.1f} s)")
            with db.read() as session:
                pending = store_rounds.unfinished_round(session)
            rnd = runner.resume() if pending is not None else \
                runner.run(runner.start(config, trigger="demo"))
            assert rnd is not None
            done.append(RoundSummary.of(rnd))
            print_rows([round_row(s) for s in done], f"prefloop demo: round {index + 1} of "
                       f"{rounds}")
    finally:
        if server is not None:
            server.stop()
    plot = plot_demo(done, runs_dir / "demo.png")
    rewards = deployed_rewards(done)
    log(f"held-out reward of the deployed policy: {' -> '.join(_fmt(r) for r in rewards)}; "
        f"plot {plot}; {time.perf_counter() - started:.0f} s in all")
    return DemoResult(done, plot, time.perf_counter() - started)


def _without_llm_judges(config: RoundConfig) -> RoundConfig:
    """The config with only non-LLM judges (--no-ai-judge)."""
    import dataclasses

    from feedback.config import load_judge_config

    keep = tuple(p for p in config.label.judges if load_judge_config(p).kind != "llm")
    label = dataclasses.replace(config.label, judges=keep)
    evaluate = dataclasses.replace(config.evaluate, judges=tuple(
        p for p in config.evaluate.judges if p in keep))
    return dataclasses.replace(config, label=label, evaluate=evaluate)
