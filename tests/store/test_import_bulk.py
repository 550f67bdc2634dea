"""The bulk import: exact rows (labels and their audit events as store.repo writes them), rows
that meet stored data, batch boundaries that change nothing, the trl-lib conversational shape
without a prompt, and odd values in every field that never end in a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlmodel import select

import store.bulk
from store import repo
from store.db import Database
from store.importing import ImportRejected, import_jsonl
from store.models import AuditEvent, Completion, Label, LabelStatus, Prompt, Task, TaskKind
from tests.store import factories
from tests.store.test_import_bad_input import counts, stored_pairs


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


LABEL_COLUMNS = ("task_id", "annotator_id", "status", "choice", "ranks", "ratings",
                 "shown_order", "rationale", "confidence", "details", "idempotency_key",
                 "request_hash")


def label_rows(db: Database) -> list[tuple]:
    with db.read() as s:
        return [tuple(getattr(label, c) for c in LABEL_COLUMNS)
                for label in s.exec(select(Label).order_by(Label.id))]


def audit_rows(db: Database) -> list[tuple]:
    with db.read() as s:
        return [(e.entity, e.entity_id, e.action, e.actor_id, e.request_id, e.old, e.new)
                for e in s.exec(select(AuditEvent).order_by(AuditEvent.id))]


def test_imported_labels_and_audit_rows_are_what_submit_label_writes(db, tmp_path):
    """The same answers through repo.submit_label (one transaction each) and through an import
    give the same label and audit rows, field for field."""
    rows = [{"prompt": "p", "chosen": "x", "rejected": "y", "rationale": "clearer",
             "confidence": 0.75},
            {"prompt": "p", "completions": ["a", "b", "c"], "ratings": [1, 3, 2],
             "annotator": "rater"},
            {"prompt": "p", "completion": "a", "label": False, "confidence": 1}]
    import_jsonl(db, write(tmp_path / "p.jsonl", rows[:1]), format="pairwise")
    import_jsonl(db, write(tmp_path / "l.jsonl", rows[1:2]), format="listwise")
    import_jsonl(db, write(tmp_path / "b.jsonl", rows[2:]), format="binary")
    imported_labels, imported_audit = label_rows(db), audit_rows(db)
    assert imported_labels[1][3:6] == (None, [3, 1, 2], [1.0, 3.0, 2.0])
    # Replay the same answers through the one-row write path, as a second annotator.
    with db.write() as s:
        judge = factories.annotator(s, "by-hand")
        for task_id, value, rationale, confidence in (
                (1, {"choice": "a"}, "clearer", 0.75),
                (2, {"ranks": [3, 1, 2], "ratings": [1, 3, 2]}, None, None),
                (3, {"choice": "down"}, None, 1)):
            repo.submit_label(session=s, task_id=task_id, annotator_id=judge.id, value=value,
                              rationale=rationale, confidence=confidence)
    by_hand_labels, by_hand_audit = label_rows(db)[3:], audit_rows(db)[3:]

    def without_annotator(row: tuple, index: int) -> tuple:
        return row[:index] + row[index + 1:]

    assert [without_annotator(r, 1) for r in imported_labels] == [
        without_annotator(r, 1) for r in by_hand_labels]
    # The audit rows differ only in the label id and the annotator (actor and snapshot).
    def audit_shape(row: tuple) -> tuple:
        new = {k: v for k, v in row[6].items() if k != "annotator_id"}
        return row[0], row[2], row[4], row[5], new
    assert [audit_shape(r) for r in imported_audit] == [audit_shape(r) for r in by_hand_audit]
    assert [(r[1], r[3], r[6]["annotator_id"]) for r in imported_audit] == [
        (1, 1, 1), (2, 2, 2), (3, 1, 1)]
    assert imported_audit[0][6] == {
        "task_id": 1, "annotator_id": 1, "status": "submitted", "choice": "a", "ranks": None,
        "ratings": None, "shown_order": None, "rationale": "clearer", "confidence": 0.75}


def test_rows_meet_stored_tasks_in_their_canonical_order_and_stored_labels(db, tmp_path):
    with db.write() as s:
        task = factories.task(s, TaskKind.listwise, prompt="q")  # answer 0, answer 1, answer 2
        repo.get_or_create_prompt(session=s, content="kept", split="test", reference="7")
    rows = [
        # The stored task, listed in another order: ranks are mapped to the task's order.
        {"prompt": "q", "completions": ["answer 2", "answer 0", "answer 1"],
         "ranking": [0, 1, 2], "annotator": "u1"},
        # The same task again by u1: a duplicate, whatever the order.
        {"prompt": "q", "completions": ["answer 1", "answer 2", "answer 0"],
         "ranking": [2, 1, 0], "annotator": "u1"},
        # An existing prompt keeps its split and reference.
        {"prompt": "kept", "completions": ["m", "n"], "ranking": [1, 0], "split": "train"},
    ]
    report = import_jsonl(db, write(tmp_path / "in.jsonl", rows), format="listwise",
                          on_error="skip", source="test")
    assert [str(e) for e in report.errors] == [
        "line 2: duplicate: annotator 'u1' already labelled this comparison"]
    assert report.created == {"completions": 2, "tasks": 1, "labels": 2}
    with db.read() as s:
        labels = s.exec(select(Label).order_by(Label.id)).all()
        prompts = s.exec(select(Prompt).order_by(Prompt.id)).all()
    # canonical order: answer 0, answer 1, answer 2; the row ranked answer 2 first.
    assert [(label.task_id, label.ranks) for label in labels] == [(task.id, [2, 3, 1]),
                                                                  (2, [2, 1])]
    assert [(p.content, p.split, p.reference) for p in prompts] == [
        ("q", "train", None), ("kept", "test", "7")]


MIXED = [
    {"prompt": "p", "chosen": "x", "rejected": "y", "annotator": "alice"},
    {"prompt": "p", "chosen": "y", "rejected": "x", "annotator": "bob"},  # same task, reversed
    {"prompt": "p", "chosen": "x", "rejected": "y", "annotator": "alice"},  # duplicate
    {"prompt": "q", "chosen": "x", "rejected": "x"},                      # identical
    {"prompt": "q", "chosen": "x", "rejected": "z", "annotator": "bot", "annotator_kind": "ai"},
    {"prompt": "q", "chosen": "x", "rejected": "z", "annotator": "bot"},  # kind clash
    "{not json",
    {"prompt": "r", "chosen": "1", "rejected": "2", "dataset": "other", "split": "test"},
    {"prompt": "r", "chosen": "1", "rejected": "2", "dataset": "other", "annotator": "bob"},
    {"prompt": "q", "chosen": "z", "rejected": "x", "annotator": "carol", "confidence": 2},
    {"prompt": "s", "chosen": "1", "rejected": "2", "annotator": "dave", "confidence": "x"},
    {"prompt": "s", "chosen": "1", "rejected": "2", "annotator": "dave", "annotator_kind": "ai"},
    {"prompt": "p", "chosen": "y", "rejected": "x", "annotator": "bob"},  # duplicate of line 2
]


def dump(db: Database) -> dict[str, list]:
    tables = ("annotator", "prompt", "completion", "task", "task_item", "label", "audit_event")
    skip = {"created_at", "updated_at", "at"}
    out = {}
    with db.engine.connect() as c:
        for table in tables:
            result = c.execute(text(f"SELECT * FROM {table} ORDER BY id"))
            keep = [i for i, name in enumerate(result.keys()) if name not in skip]
            out[table] = [tuple(row[i] for i in keep) for row in result]
    return out


@pytest.mark.parametrize("mode", ["skip", "fail"])
def test_batch_boundaries_change_nothing(tmp_path, monkeypatch, mode):
    """Row at a time (batches of 1), and batches of 4 with lookups and statements of 2 keys
    or rows, store exactly what one batch stores, and report the same errors."""
    results = []
    for name, chunk, small in (("one", 1, False), ("four", 4, True), ("all", 2000, False)):
        if small:
            monkeypatch.setattr(store.bulk, "LOOKUP_BATCH", 2)
            monkeypatch.setattr(store.bulk, "ROWS_PER_STATEMENT", 2)
        db = Database.from_url(f"sqlite:///{tmp_path / name}.db")
        from store import migrate
        migrate.upgrade(db.engine)
        path = write(tmp_path / "in.jsonl", MIXED)
        try:
            report = import_jsonl(db, path, format="pairwise", on_error=mode, chunk_rows=chunk)
        except ImportRejected as exc:
            report = exc.report
        results.append(([str(e) for e in report.errors], report.rows_written,
                         dict(report.created), dump(db)))
        monkeypatch.undo()
        db.dispose()
    assert results[0] == results[1] == results[2]
    errors, written, created, tables = results[0]
    assert errors == [
        "line 3: duplicate: annotator 'alice' already labelled this comparison",
        "line 4: chosen and rejected are identical",
        "line 6: annotator 'bot' exists with kind ai, not human",
        "line 7: not valid JSON (Expecting property name enclosed in double quotes)",
        "line 10: confidence must be between 0 and 1",
        "line 11: confidence must be a number between 0 and 1",
        "line 13: duplicate: annotator 'bob' already labelled this comparison",
    ]
    if mode == "fail":
        assert (written, created) == (0, {})
        assert all(rows == [] for rows in tables.values())
        return
    assert (written, created) == (6, {"prompts": 4, "completions": 8, "tasks": 4, "labels": 6})
    assert [row[1:3] for row in tables["annotator"]] == [
        ("alice", "human"), ("bob", "human"), ("bot", "ai"), ("import", "human"),
        ("dave", "ai")]
    # Line 12's dave is created as ai: line 11 (dave, human, bad confidence) created nothing.
    assert [(row[1], row[4]) for row in tables["label"]] == [
        (1, "a"), (1, "b"), (2, "a"), (3, "a"), (3, "a"), (4, "a")]


def conversation(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


SYSTEM, USER = ("system", "Be brief."), ("user", "Name a prime above 10.")


def test_trl_conversational_rows_without_a_prompt_split_the_shared_turns(db, tmp_path):
    rows = [{"chosen": conversation(SYSTEM, USER, ("assistant", "11")),
             "rejected": conversation(SYSTEM, USER, ("assistant", "12"))},
            {"chosen": conversation(("user", "hi"), ("assistant", "hello"), ("user", "2+2?"),
                                    ("assistant", "4")),
             "rejected": conversation(("user", "hi"), ("assistant", "hello"), ("user", "2+2?"),
                                      ("assistant", "5")), "annotator": "ana"}]
    report = import_jsonl(db, write(tmp_path / "in.jsonl", rows), format="pairwise")
    assert (report.rows_written, report.errors) == (2, [])
    assert stored_pairs(db) == [
        (conversation(SYSTEM, USER), conversation(("assistant", "11")),
         conversation(("assistant", "12")), "a"),
        (conversation(("user", "hi"), ("assistant", "hello"), ("user", "2+2?")),
         conversation(("assistant", "4")), conversation(("assistant", "5")), "a")]
    # The explicit shape of the same data is the same task: a second label by the same
    # annotator is a duplicate, another annotator's label joins it.
    explicit = [{"prompt": conversation(SYSTEM, USER),
                 "chosen": conversation(("assistant", "11")),
                 "rejected": conversation(("assistant", "12"))},
                {"prompt": conversation(SYSTEM, USER),
                 "chosen": conversation(("assistant", "12")),
                 "rejected": conversation(("assistant", "11")), "annotator": "bob"}]
    again = import_jsonl(db, write(tmp_path / "x.jsonl", explicit), format="pairwise",
                         on_error="skip")
    assert [str(e) for e in again.errors] == [
        "line 1: duplicate: annotator 'import' already labelled this comparison"]
    assert counts(db) == {"Prompt": 2, "Completion": 4, "Task": 2, "Label": 3, "AuditEvent": 3}
    with db.read() as s:
        assert s.exec(select(Label.choice).where(Label.task_id == 1)).all() == ["a", "b"]


@pytest.mark.parametrize(
    ("chosen", "rejected", "message"),
    [
        (conversation(("user", "a"), ("assistant", "x")),
         conversation(("user", "b"), ("assistant", "x")),
         "chosen and rejected share no leading turns, so they hold no prompt "
         "(add a 'prompt' field)"),
        (conversation(("user", "a"), ("assistant", "x")),
         conversation(("user", "a"), ("user", "y")),
         "rejected[1] is a user turn; the turn after the shared prompt must be an assistant "
         "turn"),
        (conversation(("user", "a"), ("assistant", "x"), ("user", "b"), ("assistant", "y")),
         conversation(("user", "a"), ("assistant", "z"), ("user", "b"), ("assistant", "y")),
         "chosen and rejected part at turn 1 (chosen[1]) but chosen goes on for 3 turns; only "
         "the last, assistant turn may differ"),
        (conversation(("user", "a"), ("assistant", "x")),
         conversation(("user", "a"), ("assistant", "x"), ("user", "more"),
                      ("assistant", "y")),
         "chosen has no turn of its own after the 2 turn(s) it shares with the other"),
        (conversation(("user", "a"), ("assistant", "x")),
         conversation(("user", "a"), ("assistant", "x")), "chosen and rejected are identical"),
        (conversation(("user", "a"), ("assistant", "x")), [{"role": "robot", "content": "x"}],
         "rejected[0].role must be one of system, user, assistant, tool"),
        (conversation(("user", "a"), ("assistant", "x")), "plain text",
         "missing field 'prompt'"),
    ],
)
def test_trl_rows_without_a_usable_shared_prompt_are_line_errors(db, tmp_path, chosen,
                                                                 rejected, message):
    rows = [{"prompt": "fine", "chosen": "a", "rejected": "b"},
            {"chosen": chosen, "rejected": rejected}]
    with pytest.raises(ImportRejected) as info:
        import_jsonl(db, write(tmp_path / "in.jsonl", rows), format="pairwise")
    assert [str(e) for e in info.value.report.errors] == [f"line 2: {message}"]
    assert counts(db)["Prompt"] == 0


ODD_VALUES = [None, True, 0, -1, 10**30, 1.5e308, "", " ", "x" * 300, [], [1], {}, {"a": 1},
              [{"role": "user"}], [{"role": "user", "content": 5}],
              [{"role": "assistant", "content": "ok"}], "up", "a", [[0, 1]], [0, 0], [1, 0]]
BASE = {
    "prompts": {"prompt": "p", "dataset": "d", "split": "s", "reference": "r"},
    "pairwise": {"prompt": "p", "chosen": "x", "rejected": "y", "annotator": "n",
                 "annotator_kind": "ai", "confidence": 0.5, "rationale": "r", "dataset": "d",
                 "split": "s", "reference": 1},
    "listwise": {"prompt": "p", "completions": ["a", "b"], "ranking": [1, 0], "ratings": None,
                 "annotator": "n", "confidence": 0.5},
    "binary": {"prompt": "p", "completion": "c", "label": "up", "annotator": "n"},
    "tasks": {"prompt": "p", "completions": ["a", "b"], "kind": "pairwise", "overlap": 2,
              "gold": {"choice": "a"}},
}


@pytest.mark.parametrize("format", list(BASE))
def test_odd_values_in_any_field_are_written_or_line_errors_never_a_crash(db, tmp_path, format):
    base = BASE[format]
    rows = [json.dumps({**base, field: value}) for field in base for value in ODD_VALUES]
    rows += [json.dumps({k: v for k, v in base.items() if k != field}) for field in base]
    report = import_jsonl(db, write(tmp_path / "in.jsonl", rows), format=format,
                          on_error="skip")
    assert report.rows_written + len(report.errors) == report.rows_read == len(rows)
    assert report.rows_written > 0 and len(report.errors) > 0
    assert all(e.message and 1 <= e.line <= len(rows) for e in report.errors)
    with db.read() as s:
        assert len(s.exec(select(Task)).all()) == report.created.get("tasks", 0)
        assert len(s.exec(select(Completion)).all()) == report.created.get("completions", 0)
        assert all(label.status == LabelStatus.submitted for label in s.exec(select(Label)))
