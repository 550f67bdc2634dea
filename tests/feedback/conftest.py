"""Fixtures for judge tests: the fault-injecting endpoint and task builders."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest

from store import repo
from store.db import Database
from store.models import TaskKind
from tests.feedback.fault_server import FaultServer


@pytest.fixture
def fault_server() -> Iterator[FaultServer]:
    server = FaultServer(hang_s=2.0, retry_after_ms=200).start()
    yield server
    server.stop()


def make_tasks(db: Database, specs: Sequence[tuple[str, str, Sequence[int]]],
               *, reference: str | None = None, prefix: str = "Question") -> list[int]:
    """One task per (mode, kind, qualities): responses say `quality=N`; returns task ids."""
    ids = []
    with db.write() as session:
        for i, (mode, kind, qualities) in enumerate(specs):
            prompt = repo.get_or_create_prompt(session=session,
                                               content=f"{prefix} {i} [mode={mode}]",
                                               reference=reference)
            completion_ids = [
                repo.get_or_create_completion(
                    session=session, prompt_id=prompt.id or 0,
                    content=f"answer {i}.{j} quality={q}", origin="external:test").id or 0
                for j, q in enumerate(qualities)]
            task, _ = repo.get_or_create_task(session=session, kind=TaskKind(kind),
                                              prompt_id=prompt.id or 0,
                                              completion_ids=completion_ids)
            ids.append(task.id or 0)
    return ids
