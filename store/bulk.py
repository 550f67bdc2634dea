"""The import's write path: checked rows (store/import_rows.py) into the store, many at a time.

`BulkWriter.write` stores a batch of `RowPlan`s with the semantics of store/repo.py's one-row
functions (`get_or_create_prompt`, `get_or_create_completion`, `get_or_create_task`,
`submit_label`), but with a handful of statements per batch instead of a handful per row:
for each table, one SELECT of the keys that may already exist, one multi-row
INSERT ... ON CONFLICT DO NOTHING RETURNING of the rest, and one more SELECT only for keys a
concurrent writer stored in between (the same race repo.py's savepoints handle). Keys that
cannot exist are not looked up: a completion of a prompt this batch created, a task over a
completion this batch created, a label on a task this batch created.

Labels get exactly what `record_label` writes: the label row (canonical value, request hash,
no idempotency key) and its `audit_event` "create" row with the same snapshot. A label that
clashes with a stored one, or with an earlier row of the import, is that row's error
("duplicate: ..."); such a row creates nothing, since its task (and everything under it) was
already there.

It never commits: the caller's transaction (one per imported file) owns the writes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Enum, Table, exists, tuple_
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Connection

from store.errors import Conflict
from store.import_rows import AnnotatorBook, KnownAnnotator, LabelPlan, RowError, RowPlan
from store.models import (
    Annotator,
    AnnotatorKind,
    ApiToken,
    AuditEvent,
    Completion,
    Label,
    LabelStatus,
    Prompt,
    Task,
    TaskItem,
    TaskKind,
    utcnow,
)
from store.repo import _request_hash, normalise_label_value, task_key

# Keys per lookup: SQLite binds at most 32766 parameters, PostgreSQL 65535; a key has up to 3.
LOOKUP_BATCH = 5000
ROWS_PER_STATEMENT, MAX_PARAMETERS = 500, 30_000


def _table(model: Any) -> Table:
    table: Table = model.__table__
    return table


PROMPT, COMPLETION, TASK, ITEM = _table(Prompt), _table(Completion), _table(Task), _table(TaskItem)
LABEL, AUDIT, ANNOTATOR, TOKEN = (_table(Label), _table(AuditEvent), _table(Annotator),
                                  _table(ApiToken))
Key = tuple[Any, ...]


def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@dataclass
class BatchResult:
    written: int
    errors: list[RowError]
    created: Counter[str]


class BulkWriter:
    """Writes an import's batches on one connection, inside the caller's transaction."""

    def __init__(self, connection: Connection, *, source: str):
        self.connection = connection
        self.origin, self.task_source = f"external:{source}", f"import:{source}"
        self.dialect = connection.dialect
        self.postgres = connection.dialect.name == "postgresql"

    # -- generic get-or-create ----------------------------------------------------------------

    def _insert(self, table: Table, rows: Sequence[dict[str, Any]], *,
                returning: tuple[str, ...] = (), skip_clashes: bool = False) -> list[Any]:
        """INSERT `rows` (dicts with the same keys) as multi-row statements; with
        `skip_clashes`, rows clashing with a unique key are left out (ON CONFLICT DO NOTHING,
        the same words on both databases) and the caller reads those back.

        Values go through each column type's own bind processor, so they are stored exactly
        as an ORM or Core insert stores them; the statements are sent to the driver as they
        are, because per-row statement processing in SQLAlchemy costs more than the insert.
        """
        if not rows:
            return []
        names = list(rows[0])
        processors = [table.c[name].type.dialect_impl(self.dialect).bind_processor(self.dialect)
                      for name in names]
        columns = []
        for name, process in zip(names, processors, strict=True):
            column = [row[name] for row in rows]
            if process is not None and isinstance(table.c[name].type, DateTime | Enum):
                # A batch shares one timestamp and a few enum values: convert each once.
                converted = {value: process(value) for value in set(column)}
                column = list(map(converted.__getitem__, column))
            elif process is not None:
                column = list(map(process, column))
            columns.append(column)
        values = list(zip(*columns, strict=True))
        quote = self.dialect.identifier_preparer.quote
        head = (f"INSERT INTO {quote(table.name)} ({', '.join(quote(n) for n in names)}) "
                f"VALUES ")
        one = "(" + ", ".join(self._placeholder(table.c[name]) for name in names) + ")"
        tail = " ON CONFLICT DO NOTHING" if skip_clashes else ""
        if not returning:
            self.connection.exec_driver_sql(head + one + tail, values)  # executemany
            return []
        tail += " RETURNING " + ", ".join(quote(name) for name in returning)
        page = max(1, min(ROWS_PER_STATEMENT, MAX_PARAMETERS // len(names)))
        out: list[Any] = []
        for start in range(0, len(values), page):
            part = values[start:start + page]
            statement = head + ", ".join([one] * len(part)) + tail
            flat = tuple(value for row in part for value in row)
            out.extend(self.connection.exec_driver_sql(statement, flat).all())
        return out

    def _placeholder(self, column: Any) -> str:
        if not self.postgres:
            return "?"
        # psycopg sends a str as text, which PostgreSQL does not assign to a json column.
        return "%s::JSON" if isinstance(column.type, JSON) else "%s"

    def _select_ids(self, table: Table, names: tuple[str, ...], keys: Sequence[Key]
                    ) -> dict[Key, int]:
        columns = [table.c[name] for name in names]
        found: dict[Key, int] = {}
        for batch in _batches(keys, LOOKUP_BATCH):
            where = (columns[0].in_([key[0] for key in batch]) if len(columns) == 1
                     else tuple_(*columns).in_(batch))
            for row in self.connection.execute(sa_select(table.c.id, *columns).where(where)):
                found[tuple(row[1:])] = row[0]
        return found

    def _get_or_create(self, table: Table, names: tuple[str, ...], rows: dict[Key, dict[str, Any]],
                       may_exist: Callable[[Key], bool]) -> tuple[dict[Key, int], set[Key]]:
        """The id of each key's row, inserting the missing ones (in `rows`' order); and the
        keys this call inserted."""
        ids = self._select_ids(table, names, [key for key in rows if may_exist(key)])
        missing = [key for key in rows if key not in ids]
        created: dict[Key, int] = {}
        if missing:
            result = self._insert(table, [rows[key] for key in missing],
                                  returning=("id", *names), skip_clashes=True)
            created = {tuple(row[1:]): row[0] for row in result}
            ids.update(created)
            raced = [key for key in missing if key not in created]
            if raced:  # stored by a concurrent transaction since the SELECT: read them back
                ids.update(self._select_ids(table, names, raced))
        if len(ids) < len(rows):
            raise AssertionError(f"{table.name}: an insert did nothing and no row explains it")
        return ids, set(created)

    # -- annotators ---------------------------------------------------------------------------

    def load_annotators(self, book: AnnotatorBook, names: Iterable[str]) -> None:
        """Put the stored annotators among `names` in the book, with what they are."""
        wanted = sorted({name for name in names if name not in book.known})
        has_token = exists().where(TOKEN.c.annotator_id == ANNOTATOR.c.id)
        for batch in _batches(wanted, LOOKUP_BATCH):
            for id_, name, kind, model, config, token in self.connection.execute(
                sa_select(ANNOTATOR.c.id, ANNOTATOR.c.name, ANNOTATOR.c.kind, ANNOTATOR.c.model,
                          ANNOTATOR.c.config, has_token).where(ANNOTATOR.c.name.in_(batch))):
                kind = AnnotatorKind(kind)
                book.known[name] = KnownAnnotator(
                    id_, kind, account=kind == AnnotatorKind.human and bool(token),
                    judge=kind != AnnotatorKind.human and (model is not None
                                                          or config is not None))

    def _create_annotators(self, book: AnnotatorBook) -> None:
        new = {(name,): {"name": name, "kind": known.kind, "role": None, "model": None,
                         "rubric_version": None, "config": None, "active": True,
                         "created_at": utcnow()}
               for name, known in book.known.items() if known.id is None}
        if not new:
            return
        ids, inserted = self._get_or_create(ANNOTATOR, ("name",), new, lambda _key: False)
        raced = sorted(name for (name,) in new if (name,) not in inserted)
        if raced:  # what another writer created under this name was not checked: start over
            raise Conflict(f"annotator {raced[0]!r} was created by another writer during this "
                           f"import; import again")
        for (name,), id_ in ids.items():
            book.known[name].id = id_

    # -- one batch ----------------------------------------------------------------------------

    def write(self, plans: Sequence[RowPlan], book: AnnotatorBook) -> BatchResult:
        created: Counter[str] = Counter()
        now = utcnow()
        self._create_annotators(book)
        prompt_rows: dict[Key, dict[str, Any]] = {}
        for plan in plans:
            prompt = plan.prompt
            prompt_rows.setdefault((prompt.dataset, prompt.hash), {
                "content": prompt.content, "content_hash": prompt.hash,
                "dataset": prompt.dataset, "split": prompt.split,
                "reference": prompt.reference, "created_at": now})
        prompt_ids, new_prompts = self._get_or_create(
            PROMPT, ("dataset", "content_hash"), prompt_rows, lambda _key: True)
        created["prompts"] += len(new_prompts)
        fresh_prompts = {prompt_ids[key] for key in new_prompts}

        completion_rows: dict[Key, dict[str, Any]] = {}
        row_prompt: list[int] = []
        for plan in plans:
            prompt_id = prompt_ids[(plan.prompt.dataset, plan.prompt.hash)]
            row_prompt.append(prompt_id)
            for content, digest in plan.completions:
                completion_rows.setdefault((prompt_id, self.origin, digest), {
                    "prompt_id": prompt_id, "content": content, "content_hash": digest,
                    "origin": self.origin, "policy_version_id": None, "generation": None,
                    "created_at": now})
        completion_ids, new_completions = self._get_or_create(
            COMPLETION, ("prompt_id", "origin", "content_hash"), completion_rows,
            lambda key: key[0] not in fresh_prompts)
        created["completions"] += len(new_completions)
        fresh_completions = {completion_ids[key] for key in new_completions}

        task_rows: dict[Key, dict[str, Any]] = {}
        order: dict[Key, list[int]] = {}
        row_tasks: list[tuple[Key, list[int]] | None] = []
        for plan, prompt_id in zip(plans, row_prompt, strict=True):
            if plan.kind is None:
                row_tasks.append(None)
                continue
            ids = [completion_ids[(prompt_id, self.origin, digest)]
                   for _, digest in plan.completions]
            key = (task_key(plan.kind, prompt_id, ids, None),)
            row_tasks.append((key, ids))
            if key not in task_rows:
                order[key] = ids
                task_rows[key] = {
                    "task_key": key[0], "kind": plan.kind, "prompt_id": prompt_id,
                    "round_id": None, "overlap": plan.overlap, "gold": plan.gold, "priority": 0,
                    "source": self.task_source, "created_at": now}
        task_ids, new_tasks = self._get_or_create(
            TASK, ("task_key",), task_rows,
            lambda key: not fresh_completions.intersection(order[key]))
        created["tasks"] += len(new_tasks)
        if new_tasks:
            self._insert(ITEM, [
                {"task_id": task_ids[key], "position": position, "completion_id": completion}
                for key in task_rows if key in new_tasks
                for position, completion in enumerate(order[key])])
        canonical = {task_ids[key]: order[key] for key in new_tasks}
        stored = [task_ids[key] for key in task_rows if key not in new_tasks]
        for batch in _batches(stored, LOOKUP_BATCH):
            for task_id, completion_id in self.connection.execute(
                    sa_select(ITEM.c.task_id, ITEM.c.completion_id)
                    .where(ITEM.c.task_id.in_(batch)).order_by(ITEM.c.task_id, ITEM.c.position)):
                canonical.setdefault(task_id, []).append(completion_id)

        labelled = [(plan, task_ids[entry[0]], entry[1])
                    for plan, entry in zip(plans, row_tasks, strict=True)
                    if entry is not None and plan.label is not None]
        errors = self._labels(labelled, canonical, {task_ids[key] for key in new_tasks}, book,
                              created, now)
        return BatchResult(len(plans) - len(errors), errors, created)

    def _labels(self, labelled: list[tuple[RowPlan, int, list[int]]],
                canonical: dict[int, list[int]], fresh_tasks: set[int], book: AnnotatorBook,
                created: Counter[str], now: datetime) -> list[RowError]:
        keys = [(task_id, book.known[_label(plan).annotator].id)
                for plan, task_id, _ in labelled]
        existing = set(self._select_ids(LABEL, ("task_id", "annotator_id"),
                                        [key for key in keys if key[0] not in fresh_tasks]))
        errors: list[RowError] = []
        rows: list[dict[str, Any]] = []
        lines: dict[Key, RowPlan] = {}
        for (plan, task_id, row_ids), key in zip(labelled, keys, strict=True):
            label = _label(plan)
            if key in existing or key in lines:
                errors.append(_duplicate(plan))
                continue
            lines[key] = plan
            assert plan.kind is not None and key[1] is not None
            clean = normalise_label_value(plan.kind, len(row_ids),
                                          _value(plan.kind, label, row_ids, canonical[task_id]))
            rows.append({
                "task_id": task_id, "annotator_id": key[1], "status": LabelStatus.submitted,
                "choice": clean.get("choice"), "ranks": clean.get("ranks"),
                "ratings": clean.get("ratings"), "shown_order": None,
                "rationale": label.rationale, "confidence": label.confidence, "details": None,
                "idempotency_key": None, "created_at": now, "updated_at": now,
                "request_hash": _request_hash(task_id, LabelStatus.submitted, clean, None,
                                              label.rationale, label.confidence)})
        if not rows:
            return errors
        label_ids = {(task_id, annotator_id): id_ for id_, task_id, annotator_id in self._insert(
            LABEL, rows, returning=("id", "task_id", "annotator_id"), skip_clashes=True)}
        audit = []
        for row in rows:
            key = (row["task_id"], row["annotator_id"])
            if key not in label_ids:  # a concurrent writer labelled it since the SELECT
                errors.append(_duplicate(lines[key]))
                continue
            audit.append({
                "entity": "label", "entity_id": label_ids[key], "action": "create",
                "actor_id": row["annotator_id"], "request_id": None, "at": row["created_at"],
                "new": {"task_id": row["task_id"], "annotator_id": row["annotator_id"],
                        "status": LabelStatus.submitted.value, "choice": row["choice"],
                        "ranks": row["ranks"], "ratings": row["ratings"], "shown_order": None,
                        "rationale": row["rationale"], "confidence": row["confidence"]}})
        if audit:
            self._insert(AUDIT, audit)
        created["labels"] += len(audit)
        return errors


def _label(plan: RowPlan) -> LabelPlan:
    assert plan.label is not None
    return plan.label


def _duplicate(plan: RowPlan) -> RowError:
    return RowError(plan.line, f"duplicate: annotator {_label(plan).annotator!r} already "
                               f"labelled this comparison")


def _value(kind: TaskKind, label: LabelPlan, row_ids: list[int], canonical: list[int]
           ) -> dict[str, Any]:
    """The row's answer in the task's canonical order (a stored task may list its completions
    in another order than this row)."""
    if kind == TaskKind.pairwise:
        return {"choice": "a" if canonical[0] == row_ids[0] else "b"}
    if kind == TaskKind.binary:
        return {"choice": label.choice}
    assert label.ranks is not None
    position = {completion: i for i, completion in enumerate(row_ids)}
    value: dict[str, Any] = {"ranks": [label.ranks[position[c]] for c in canonical]}
    if label.ratings is not None:
        value["ratings"] = [label.ratings[position[c]] for c in canonical]
    return value


__all__ = ["BatchResult", "BulkWriter"]
