"""The admin view's rounds section: history rows, the schedule, and the server-side PNG plot."""

from __future__ import annotations

import pytest

from store import rounds as store_rounds
from store.models import utcnow

pytest.importorskip("gradio")
pytest.importorskip("matplotlib")


def _finished_round(db, *, win_rate: float, reward: tuple[float, float], error: str | None = None
                    ) -> int:
    with db.write() as session:
        rnd = store_rounds.create_round(session, algo="dpo", config={}, trigger="interval")
        stage_outputs = {"label": {"labels": {"rule": 10, "ai": 3, "ai_invalid": 5,
                                              "human": 1}},
                         "build_dataset": {"rows": 7},
                         "evaluate": {"win_rate": win_rate, "kl": 0.25,
                                      "reward": {"deployed": reward[0],
                                                 "candidate": reward[1]}},
                         "timings": {"generate": 3.0, "train": 5.0}}
        for stage in store_rounds.STAGES[:-1]:
            store_rounds.advance(session, round_id=rnd.id, expected=stage,
                                 to=store_rounds.next_state(stage),
                                 outputs=stage_outputs if stage == "collect" else {})
        store_rounds.advance(session, round_id=rnd.id, expected="decide", to="promoted")
        if error is not None:
            store_rounds.record_error(session, round_id=rnd.id, error=error)
        return rnd.id


def test_history_has_one_row_per_round_with_its_metrics_and_error_text_stays_text(sqlite_db):
    from app.admin import rounds_history, rounds_plot

    hostile = "<img src=x onerror=alert(1)>"
    _finished_round(sqlite_db, win_rate=0.7, reward=(0.2, 0.5))
    second = _finished_round(sqlite_db, win_rate=0.6, reward=(0.5, 0.6), error=hostile)
    history = rounds_history(sqlite_db)
    assert history["round"].tolist() == [1, second]
    assert history["win rate"].tolist() == [0.7, 0.6]
    assert history["reward after"].tolist() == [0.5, 0.6]
    assert history["labels ai"].tolist() == [3, 3] and history["ai invalid"].tolist() == [5, 5]
    assert history["wall s"].tolist() == [8.0, 8.0]
    assert history["error"].tolist() == ["", hostile]  # a dataframe cell: shown as text
    image = rounds_plot(history)
    assert image.format == "PNG" and image.size[0] > 800


def test_schedule_table_shows_the_stored_schedule_and_labels_since(sqlite_db):
    from app.admin import rounds_plot, schedule_table

    with sqlite_db.write() as session:
        store_rounds.save_schedule(session, name="default",
                                   config={"interval_s": 3600, "cron": "0 * * * *",
                                           "min_new_labels": 50},
                                   next_run_at=utcnow(), owner="host:1:x")
    table = schedule_table(sqlite_db)
    assert table["runs"].tolist() == ["every 3600 s or cron 0 * * * * or after 50 new labels"]
    assert table["labels since"].tolist() == [0]
    import pandas as pd

    assert rounds_plot(pd.DataFrame()) is None
