"""store/rounds.py: the round state machine's write path and the round lock, on both databases."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from store import rounds
from store.errors import Conflict, InvalidInput
from store.models import Round, utcnow


def _new(db, **kw):
    with db.write() as session:
        return rounds.create_round(session, algo="dpo", config={"seed": 1}, **kw).id


def test_a_round_advances_through_every_stage_and_keeps_each_stages_outputs(db):
    round_id = _new(db)
    for stage in rounds.STAGES[:-1]:
        with db.write() as session:
            rounds.advance(session, round_id=round_id, expected=stage,
                           to=rounds.next_state(stage), outputs={stage: {"done": stage}})
    with db.write() as session:
        rnd = rounds.advance(session, round_id=round_id, expected="decide", to="promoted",
                             outputs={"decide": {"win_rate": 0.7}})
    with db.read() as session:
        stored = session.get(Round, round_id)
    assert stored.state == "promoted"
    assert stored.finished_at is not None
    assert set(stored.metrics) == set(rounds.STAGES)
    assert stored.metrics["train"] == {"done": "train"}
    assert rnd.metrics["decide"] == {"win_rate": 0.7}


def test_advance_is_a_compare_and_set_so_a_stale_caller_writes_nothing(db):
    round_id = _new(db)
    with db.write() as session:
        rounds.advance(session, round_id=round_id, expected="collect", to="generate",
                       outputs={"collect": {"n": 1}})
    with pytest.raises(rounds.StaleState), db.write() as session:
        rounds.advance(session, round_id=round_id, expected="collect", to="generate",
                       outputs={"collect": {"n": 2}})
    with db.read() as session:
        assert session.get(Round, round_id).metrics == {"collect": {"n": 1}}


def test_skipping_a_stage_or_leaving_a_final_state_is_refused(db):
    round_id = _new(db)
    with pytest.raises(InvalidInput), db.write() as session:
        rounds.advance(session, round_id=round_id, expected="collect", to="train")
    with db.write() as session:
        rounds.cancel_round(session, round_id=round_id, reason="test")
    with pytest.raises(InvalidInput), db.write() as session:
        rounds.advance(session, round_id=round_id, expected="cancelled", to="collect")


def test_only_one_unfinished_round_at_a_time(db):
    first = _new(db)
    with pytest.raises(Conflict, match=f"round {first} is unfinished"), db.write() as session:
        rounds.create_round(session, algo="dpo", config={})
    with db.write() as session:
        rounds.cancel_round(session, round_id=first, reason="abandoned")
    second = _new(db)
    assert second == first + 1


def test_two_processes_racing_to_advance_one_round_advance_it_once(db):
    round_id = _new(db)
    outcomes: list[str] = []
    barrier = threading.Barrier(4)

    def worker(i: int) -> None:
        barrier.wait()
        try:
            with db.write() as session:
                rounds.advance(session, round_id=round_id, expected="collect", to="generate",
                               outputs={"collect": {"by": i}})
            outcomes.append("advanced")
        except rounds.StaleState:
            outcomes.append("stale")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["advanced", "stale", "stale", "stale"]


def test_the_round_lock_is_a_lease_that_expires(db):
    now = utcnow()
    with db.write() as session:
        assert rounds.acquire_lock(session, holder="a", ttl_s=60, now=now)
    with db.write() as session:
        assert not rounds.acquire_lock(session, holder="b", ttl_s=60, now=now)
        assert rounds.acquire_lock(session, holder="a", ttl_s=60, now=now)  # re-entrant
        assert rounds.renew_lock(session, holder="a", ttl_s=60, now=now)
        assert not rounds.renew_lock(session, holder="b", ttl_s=60, now=now)
    later = now + timedelta(seconds=61)
    with db.write() as session:
        assert rounds.acquire_lock(session, holder="b", ttl_s=60, now=later)
        assert not rounds.renew_lock(session, holder="a", ttl_s=60, now=later)
        assert not rounds.release_lock(session, holder="a")
        assert rounds.release_lock(session, holder="b")
    with db.read() as session:
        assert not rounds.lock_state(session).held()


def test_label_watermark_counts_only_newer_labels(db):
    from store import repo
    from tests.store.factories import annotator, task

    with db.write() as session:
        ana = annotator(session, "ana")
        first = task(session, prompt="one")
        repo.submit_label(session=session, task_id=first.id, annotator_id=ana.id,
                          value={"choice": "a"})
    with db.read() as session:
        watermark = rounds.max_label_id(session)
        assert watermark > 0 and rounds.labels_since(session, watermark) == 0
    with db.write() as session:
        for prompt in ("two", "three"):
            t = task(session, prompt=prompt)
            repo.submit_label(session=session, task_id=t.id, annotator_id=ana.id,
                              value={"choice": "b"})
    with db.read() as session:
        assert rounds.labels_since(session, watermark) == 2
        assert rounds.labels_since(session, 0) == 3


def test_schedule_row_round_trips(db):
    with db.write() as session:
        rounds.save_schedule(session, name="default", config={"interval_s": 60},
                             next_run_at=utcnow(), owner="me", label_watermark=5)
    with db.write() as session:
        rounds.save_schedule(session, name="default", config={"interval_s": 30},
                             next_run_at=None, owner="me")
    with db.read() as session:
        row = rounds.get_schedule(session, "default")
    assert row is not None and row.config == {"interval_s": 30} and row.label_watermark == 5
