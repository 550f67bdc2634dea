"""`prefloop import` on bad bytes, bad JSON, text the store cannot keep, and on annotators it must
not write as: each is a "line N: ..." error through the real command, on SQLite and PostgreSQL;
--on-error fail writes nothing, --on-error skip writes exactly the good rows."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import func, select
from typer.testing import CliRunner

import cli
from store import accounts, repo
from store.db import Database
from store.errors import Conflict, InvalidInput
from store.importing import ImportRejected, import_jsonl
from store.models import (
    Annotator,
    AnnotatorKind,
    AuditEvent,
    Completion,
    Label,
    Prompt,
    Role,
    Task,
)

GOOD_FIRST = json.dumps({"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"})
GOOD_LAST = json.dumps({"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"})


def run_import(db: Database, path: Path, *args: str):
    url = db.engine.url.render_as_string(hide_password=False)
    result = CliRunner().invoke(cli.app, ["--db", url, "import", str(path), *args],
                                catch_exceptions=False)
    # Rich wraps long lines to the terminal's width; compare the words.
    return result.exit_code, " ".join(result.output.split())


def counts(db: Database) -> dict[str, int]:
    with db.read() as s:
        return {m.__name__: s.exec(select(func.count()).select_from(m)).one()
                for m in (Prompt, Completion, Task, Label, AuditEvent)}


def stored_pairs(db: Database) -> list[tuple[object, object, object, str | None]]:
    """(prompt, chosen, rejected, choice) of every pairwise label, in task order."""
    with db.read() as s:
        out = []
        for task in s.exec(select(Task).order_by(Task.id)):
            prompt = s.get(Prompt, task.prompt_id)
            ids = repo.task_completion_ids(session=s, task_id=task.id)
            a, b = (s.get(Completion, i).content for i in ids)
            label = s.exec(select(Label).where(Label.task_id == task.id)).one()
            chosen, rejected = (a, b) if label.choice == "a" else (b, a)
            out.append((prompt.content, chosen, rejected, label.choice))
        return out


DEEP = b'{"prompt": ' + b"[" * 1000 + b"]" * 1000 + b', "chosen": "a", "rejected": "b"}'
BAD_LINES = [
    pytest.param(b'{"prompt": "p\xff", "chosen": "a", "rejected": "b"}',
                 "not valid UTF-8 (byte 0xff at byte 14 of the line)", id="non-utf8"),
    pytest.param(DEEP, "nested deeper than 64 levels", id="1000-deep"),
    pytest.param(b'{"prompt": "p", "chosen": "a", "rejected": "b", "x": '
                 + b"[" * 65 + b"]" * 65 + b"}", "nested deeper than 64 levels", id="65-deep"),
    pytest.param(b'{"prompt": "p\\ud800", "chosen": "a", "rejected": "b"}',
                 "prompt contains a lone surrogate (\\ud800), which is not valid Unicode",
                 id="lone-surrogate"),
    pytest.param(b'{"prompt": [{"role": "user", "content": "x\\udfff"}], '
                 b'"chosen": "a", "rejected": "b"}',
                 "prompt[0].content contains a lone surrogate (\\udfff), which is not valid "
                 "Unicode", id="lone-surrogate-in-a-message"),
    pytest.param(b'{"prompt": "p", "chosen": "a\\u0000b", "rejected": "b"}',
                 "chosen contains a NUL character (\\u0000), which the store cannot keep",
                 id="nul"),
    pytest.param(b'{"prompt": "p", "chosen": "a", "rejected": "b", "annotator": "x\\u0000"}',
                 "annotator contains a NUL character (\\u0000), which the store cannot keep",
                 id="nul-in-annotator"),
    pytest.param(b'{"prompt": "p", "chosen": "a", "rejected": "b", "rationale\\u0000": 1}',
                 "a field name contains a NUL character (\\u0000), which the store cannot keep",
                 id="nul-in-a-field-name"),
    pytest.param(b'{"prompt": "p", "chosen": "a", "rejected": "b", "confidence": NaN}',
                 "not valid JSON (NaN is not a JSON number)", id="nan"),
    pytest.param(b'{"prompt": "p", "chosen": "a", "rejected": "b", "confidence": -Infinity}',
                 "not valid JSON (-Infinity is not a JSON number)", id="infinity"),
    pytest.param(b'{"prompt": "p", "chosen": "a", "rejected": "b", "confidence": 1'
                 + b"0" * 5000 + b"}", "not valid JSON (a number has too many digits)",
                 id="5000-digit-number"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_bad_bytes_and_text_are_line_errors_and_fail_writes_nothing(db, tmp_path, line, message):
    path = tmp_path / "in.jsonl"
    path.write_bytes(GOOD_FIRST.encode() + b"\n" + line + b"\n" + GOOD_LAST.encode() + b"\n")
    code, output = run_import(db, path, "--format", "pairwise")
    assert code == 1
    assert f"line 2: {message} error: {path}: 1 bad row(s); nothing was written" in output
    assert "Traceback" not in output
    assert counts(db) == {"Prompt": 0, "Completion": 0, "Task": 0, "Label": 0, "AuditEvent": 0}


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_bad_bytes_and_text_are_skipped_and_the_good_rows_written(db, tmp_path, line, message):
    path = tmp_path / "in.jsonl"
    path.write_bytes(GOOD_FIRST.encode() + b"\n" + line + b"\n" + GOOD_LAST.encode() + b"\n")
    code, output = run_import(db, path, "--format", "pairwise", "--on-error", "skip")
    assert code == 0, output
    assert f"skipped line 2: {message}" in output
    assert f"{path}: 2 of 3 rows imported" in output
    assert stored_pairs(db) == [("What is 2 + 2?", "4", "5", "a"),
                                ("Capital of France?", "Paris", "Lyon", "a")]
    assert counts(db) == {"Prompt": 2, "Completion": 4, "Task": 2, "Label": 2, "AuditEvent": 2}


def test_a_file_of_bad_bytes_only_fails_cleanly(db, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\xff\xfe\x00\x01\n\x80\n")
    code, output = run_import(db, path, "--format", "prompts")
    assert code == 1
    assert ("line 1: not valid UTF-8 (byte 0xff at byte 1 of the line) "
            "line 2: not valid UTF-8 (byte 0x80 at byte 1 of the line)") in output
    assert counts(db)["Prompt"] == 0


def test_a_byte_order_mark_is_not_an_error(db, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD_FIRST.encode() + b"\r\n" + GOOD_LAST.encode())
    assert run_import(db, path, "--format", "pairwise")[0] == 0
    assert counts(db)["Label"] == 2


def test_a_lone_surrogate_in_the_source_is_refused_before_reading(db, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(GOOD_FIRST + "\n")
    with pytest.raises(InvalidInput, match=r"^source contains a lone surrogate \(\\udcff\)"):
        import_jsonl(db, path, format="pairwise", source="bad\udcff")
    assert counts(db)["Prompt"] == 0


# ---------------------------------------------------------------------------------------------
# Whose name an import writes in


def pair(annotator: str | None = None, prompt: str = "p", **extra: object) -> str:
    row: dict[str, object] = {"prompt": prompt, "chosen": "good", "rejected": "bad", **extra}
    if annotator is not None:
        row["annotator"] = annotator
    return json.dumps(row)


def test_an_import_never_writes_labels_as_a_persons_account(db, tmp_path):
    with db.write() as s:
        accounts.create_account(session=s, name="ana", role=Role.annotator)
        accounts.create_account(session=s, name="root", role=Role.admin)
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([pair("importer"), pair("ana", prompt="q"),
                               pair(prompt="r", annotator="root")]) + "\n")
    code, output = run_import(db, path, "--format", "pairwise")
    assert code == 1
    assert ("line 2: annotator 'ana' is a person's account; an import cannot write labels in a "
            "person's name (name the import's own annotator instead)") in output
    assert "line 3: annotator 'root' is a person's account" in output
    assert counts(db)["Label"] == 0
    code, output = run_import(db, path, "--format", "pairwise", "--on-error", "skip")
    assert code == 0 and f"{path}: 1 of 3 rows imported" in output
    with db.read() as s:
        labels = [(s.get(Annotator, label.annotator_id).name, label.choice)
                  for label in s.exec(select(Label))]
    assert labels == [("importer", "a")]


def test_a_revoked_or_expired_account_is_still_a_person(db, tmp_path):
    with db.write() as s:
        ana, _ = accounts.create_account(session=s, name="ana", role=Role.annotator)
        accounts.revoke_tokens(session=s, annotator_id=ana.id)
        ana.active = False
        s.add(ana)
    path = tmp_path / "in.jsonl"
    path.write_text(pair("ana") + "\n")
    with pytest.raises(ImportRejected) as info:
        import_jsonl(db, path, format="pairwise")
    assert [str(e) for e in info.value.report.errors] == [
        "line 1: annotator 'ana' is a person's account; an import cannot write labels in a "
        "person's name (name the import's own annotator instead)"]


def test_an_import_never_writes_labels_as_a_configured_judge(db, tmp_path):
    with db.write() as s:
        repo.get_or_create_annotator(session=s, name="judge-v1", kind=AnnotatorKind.ai,
                                     model="smollm2", config={"rubric": "helpful"})
    path = tmp_path / "in.jsonl"
    path.write_text(pair("judge-v1", annotator_kind="ai") + "\n"
                    + pair("judge-v1", prompt="q") + "\n")
    with pytest.raises(ImportRejected) as info:
        import_jsonl(db, path, format="pairwise")
    assert [str(e) for e in info.value.report.errors] == [
        "line 1: annotator 'judge-v1' is a judge configured in this store; an import cannot "
        "write labels in its name (name the import's own annotator instead)",
        "line 2: annotator 'judge-v1' exists with kind ai, not human"]


def test_import_identities_are_reused_by_later_imports_and_can_never_sign_in(db, tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text(pair("alice") + "\n" + pair(annotator_kind="ai", prompt="q") + "\n")
    second.write_text(pair("alice", prompt="r") + "\n")
    import_jsonl(db, first, format="pairwise", source="hh")
    assert import_jsonl(db, second, format="pairwise", source="hh").rows_written == 1
    with db.read() as s:
        people = [(a.name, a.kind.value, a.role, a.model, a.config)
                  for a in s.exec(select(Annotator).order_by(Annotator.id))]
    # The default annotator is the source; a human import identity has no role.
    assert people == [("alice", "human", None, None, None), ("hh", "ai", None, None, None)]
    with db.write() as s, pytest.raises(InvalidInput, match="only human accounts"):
        accounts.issue_token(session=s, annotator_id=1, ttl=timedelta(days=1))
    with db.write() as s, pytest.raises(Conflict, match="already exists"):
        accounts.create_account(session=s, name="alice", role=Role.annotator)
