"""Agreement and stats: Krippendorff's alpha against the published worked example, and
`GET /api/stats` on labels whose agreement is known by hand."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from app.metrics import interval, krippendorff_alpha
from store import repo
from store.db import Database
from tests.app.conftest import bearer
from tests.app.helpers import add_task, add_user

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 observers,
# 12 units, missing values left out. Published: nominal 0.743, interval 0.849.
EXAMPLE = [[1, 1, 1], [2, 2, 3, 2], [3, 3, 3, 3], [3, 3, 3, 3], [2, 2, 2, 2], [1, 2, 3, 4],
           [4, 4, 4, 4], [1, 1, 2, 1], [2, 2, 2, 2], [5, 5, 5], [1, 1], [3]]


def test_alpha_matches_the_published_example() -> None:
    assert krippendorff_alpha(EXAMPLE) == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha(EXAMPLE, interval) == pytest.approx(0.849, abs=5e-4)


def test_alpha_edge_cases() -> None:
    assert krippendorff_alpha([["a", "a"], ["b", "b"]]) == 1.0
    assert krippendorff_alpha([["a", "b"], ["b", "a"]]) == pytest.approx(-0.5)
    assert krippendorff_alpha([["a", "a"], ["a", "a"]]) is None  # no variation: undefined
    assert krippendorff_alpha([["a"], ["b"]]) is None  # no unit has two values


def test_stats_report_sources_throughput_and_agreement(db: Database,
                                                       make_client: Client) -> None:
    client = make_client(db)
    _, admin = add_user(db, "root", "admin")
    ann, _ = add_user(db, "ann")
    bob, _ = add_user(db, "bob")
    t1, t2 = add_task(db, prompt="one", overlap=2), add_task(db, prompt="two", overlap=2)
    judge_task = add_task(db, prompt="three")
    with db.write() as session:
        judge = repo.get_or_create_annotator(session=session, name="judge", kind="ai")
        for task_id, annotator_id, choice in ((t1, ann, "a"), (t1, bob, "a"), (t2, ann, "a"),
                                              (t2, bob, "b"), (judge_task, judge.id, "b")):
            repo.submit_label(session=session, task_id=task_id, annotator_id=annotator_id,
                              value={"choice": choice})
    stats = client.get("/api/stats", headers=bearer(admin)).json()
    assert stats["labels_by_source"] == {"ai": 1, "human": 4, "task_source:none": 5}
    # units [a, a] and [a, b]: observed disagreement 2/4 equals expected 6/12, alpha = 0
    assert stats["agreement"]["pairwise"] == {
        "metric": "krippendorff_alpha_nominal", "alpha": 0.0, "tasks_with_2plus": 2,
        "labels": 4}
    people = {a["name"]: a for a in stats["annotators"]}
    assert (people["ann"]["labels"], people["bob"]["labels"], people["root"]["labels"]) == (
        2, 2, 0)
    assert "judge" not in people
    assert sum(row["labels"] for row in stats["labels_per_hour"]) == 5


Client = Callable[..., TestClient]
