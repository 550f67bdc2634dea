"""The admin view (Gradio, mounted at /admin, admins only): counts by source, per-annotator
throughput and gold accuracy, inter-annotator agreement, and labels over time."""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from app import metrics
from app.auth import user_from_request
from store.db import Database


def build_admin(db: Database) -> gr.Blocks:
    def refresh(request: gr.Request) -> tuple[Any, ...]:
        connection = getattr(request, "request", None)
        user = user_from_request(connection, db) if connection is not None else None
        if user is None or not user.is_admin:
            empty = pd.DataFrame()
            return ("**Admins only.** [Log in](/login?next=/admin/).", empty, empty, empty,
                    empty)
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
        return counts, sources, people, agreement, over_time

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
        outputs = [counts, sources, people, agreement, plot]
        demo.load(refresh, outputs=outputs)
        refresh_button.click(refresh, outputs=outputs)
    return demo
