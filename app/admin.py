"""The admin view (Gradio, mounted at /admin, admins only): counts by source, per-annotator
throughput and gold accuracy, inter-annotator agreement, labels over time, and the training
rounds: the schedule, the history with per-round metrics, and plots (win rate, held-out reward,
KL, labels by source over rounds) rendered server-side as a PNG with matplotlib. Text from the
store goes into dataframes (shown as text), never into raw HTML."""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from app import metrics
from app.auth import user_from_request
from store.db import Database

ROUND_COLUMNS = ["round", "algo", "trigger", "outcome", "labels rule", "labels ai",
                 "ai invalid", "labels human", "train pairs", "win rate", "reward before",
                 "reward after", "KL to base", "wall s", "error"]


def rounds_history(db: Database) -> pd.DataFrame:
    """One row per round (oldest first) with its metrics."""
    from store.rounds import summaries

    rows = []
    for s in summaries(db, limit=200):
        rows.append([s.id, s.algo, s.trigger or "", s.state, s.labels.get("rule", 0),
                     s.labels.get("ai", 0), s.labels.get("ai_invalid", 0),
                     s.labels.get("human", 0), s.train_rows, s.win_rate, s.reward_deployed,
                     s.reward_candidate, s.kl, round(s.wall_s, 1), (s.error or "")[:200]])
    return pd.DataFrame(rows, columns=ROUND_COLUMNS)


def schedule_table(db: Database) -> pd.DataFrame:
    """The round schedules (what `prefloop up` runs rounds on) and the round lock."""
    from store import rounds as store_rounds

    with db.read() as session:
        schedules = store_rounds.list_schedules(session)
        lock = store_rounds.lock_state(session)
        rows = [[row.name, _describe(row.config), row.next_run_at, row.last_run_at,
                 row.last_round_id,
                 store_rounds.labels_since(session, row.label_watermark), row.owner or ""]
                for row in schedules]
    frame = pd.DataFrame(rows, columns=["schedule", "runs", "next run (UTC)", "last run (UTC)",
                                        "last round", "labels since", "scheduler"])
    if lock.held():
        frame.attrs["running"] = f"round {lock.round_id} running ({lock.holder})"
    return frame


def _describe(config: dict[str, Any]) -> str:
    parts = []
    if config.get("interval_s"):
        parts.append(f"every {config['interval_s']:g} s")
    if config.get("cron"):
        parts.append(f"cron {config['cron']}")
    if config.get("min_new_labels"):
        parts.append(f"after {config['min_new_labels']} new labels")
    return " or ".join(parts)


def rounds_plot(history: pd.DataFrame) -> Any:
    """Win rate, held-out reward, KL and labels by source over rounds, as a PIL image (or None
    when there are no rounds or matplotlib is not installed)."""
    if history.empty:
        return None
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    ids = history["round"].tolist()

    def series(name: str) -> list[float]:
        return [float("nan") if v is None or pd.isna(v) else float(v) for v in history[name]]

    fig, axes = plt.subplots(1, 4, figsize=(15, 3.2))
    axes[0].plot(ids, series("win rate"), marker="o")
    axes[0].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[0].set_title("win rate vs deployed")
    axes[1].plot(ids, series("reward before"), marker="o", label="deployed")
    axes[1].plot(ids, series("reward after"), marker="s", label="candidate")
    axes[1].set_title("held-out reward")
    axes[1].legend(fontsize=8)
    axes[2].plot(ids, series("KL to base"), marker="o", color="tab:red")
    axes[2].set_title("KL to base (nats)")
    bottom = [0.0] * len(ids)
    for column in ("labels rule", "labels ai", "ai invalid", "labels human"):
        values = series(column)
        axes[3].bar(ids, values, bottom=bottom, label=column)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    axes[3].set_title("labels by source")
    axes[3].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("round")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer)


def build_admin(db: Database) -> gr.Blocks:
    def refresh(request: gr.Request) -> tuple[Any, ...]:
        connection = getattr(request, "request", None)
        user = user_from_request(connection, db) if connection is not None else None
        if user is None or not user.is_admin:
            empty = pd.DataFrame()
            return ("**Admins only.** [Log in](/login?next=/admin/).", empty, empty, empty,
                    empty, empty, empty, None)
        stats = metrics.project_stats(db)
        sources = pd.DataFrame(sorted(stats.labels_by_source.items()),
                               columns=["source", "labels"])
        people = pd.DataFrame(stats.annotators)
        agreement = pd.DataFrame([{"kind": kind, **values}
                                  for kind, values in stats.agreement.items()])
        over_time = pd.DataFrame(stats.labels_per_hour or [], columns=["hour", "source",
                                                                        "labels"])
        if not over_time.empty:
            over_time["hour"] = pd.to_datetime(over_time["hour"])
        counts = " · ".join(f"{k}: **{v}**" for k, v in stats.counts.items()
                            if "." not in k)
        history = rounds_history(db)
        return (counts, sources, people, agreement, over_time, schedule_table(db), history,
                rounds_plot(history))

    with gr.Blocks(title="prefloop · admin") as demo:
        gr.Markdown("## prefloop admin")
        counts = gr.Markdown(elem_id="admin-counts")
        refresh_button = gr.Button("Refresh", elem_id="admin-refresh")
        gr.Markdown("### Labels by source")
        sources = gr.Dataframe(elem_id="admin-sources", interactive=False)
        gr.Markdown("### Annotators: throughput and gold accuracy")
        people = gr.Dataframe(elem_id="admin-annotators", interactive=False)
        gr.Markdown("### Inter-annotator agreement (Krippendorff's alpha)")
        agreement = gr.Dataframe(elem_id="admin-agreement", interactive=False)
        gr.Markdown("### Labels over time")
        plot = gr.LinePlot(x="hour", y="labels", color="source", elem_id="admin-plot")
        gr.Markdown("### Training rounds: schedule")
        schedule = gr.Dataframe(elem_id="admin-schedule", interactive=False)
        gr.Markdown("### Training rounds: history")
        history = gr.Dataframe(elem_id="admin-rounds", interactive=False)
        rounds_image = gr.Image(type="pil", elem_id="admin-rounds-plot", interactive=False,
                                label="rounds")
        outputs = [counts, sources, people, agreement, plot, schedule, history, rounds_image]
        demo.load(refresh, outputs=outputs)
        refresh_button.click(refresh, outputs=outputs)
    return demo
