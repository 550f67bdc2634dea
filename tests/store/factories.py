"""Small builders for store tests (they use the real write path, store.repo)."""

from __future__ import annotations

from sqlmodel import Session

from store import repo
from store.models import Annotator, AnnotatorKind, Task, TaskKind


def annotator(session: Session, name: str, kind: AnnotatorKind = AnnotatorKind.human
              ) -> Annotator:
    return repo.get_or_create_annotator(session=session, name=name, kind=kind)


def task(session: Session, kind: TaskKind = TaskKind.pairwise, k: int | None = None,
         prompt: str = "What is 2 + 2?", overlap: int = 1) -> Task:
    k = k or {TaskKind.pairwise: 2, TaskKind.binary: 1, TaskKind.listwise: 3}[kind]
    p = repo.get_or_create_prompt(session=session, content=prompt)
    ids = [repo.get_or_create_completion(session=session, prompt_id=p.id, content=f"answer {i}",
                                         origin="external:test").id for i in range(k)]
    t, _ = repo.get_or_create_task(session=session, kind=kind, prompt_id=p.id,
                                   completion_ids=ids, overlap=overlap)
    return t
