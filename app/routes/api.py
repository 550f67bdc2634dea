"""The REST API under /api: tasks for annotators, labels, and admin routes.

Every route authenticates (bearer token or session cookie) and authorises per object: a task is
visible only to the annotator it was leased to, a label only to its author; anything else is
404, never data. Store errors become 4xx in one exception handler (app/main.py).

    curl -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:8000/api/tasks/next?kind=pairwise"
"""

from __future__ import annotations

import functools
from typing import Annotated, Literal

from fastapi import APIRouter, Header, HTTPException, Path, Query, Request, Response, status
from starlette.concurrency import run_in_threadpool

from app import annotation, metrics
from app.auth import AdminUser, CurrentUser, Store
from app.schemas import (
    DB_INT_MAX,
    NO_NUL,
    LabelIn,
    LabelOut,
    LabelsPage,
    Me,
    NextTask,
    Problem,
    PromptIn,
    PromptOut,
    Stats,
    TaskIn,
    TaskOut,
)
from app.settings import Settings
from store.models import TaskKind

ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": Problem, "description": text} for code, text in (
        (401, "Not authenticated"), (403, "Not allowed for your role"),
        (404, "No such object of yours"), (409, "Conflicts with what is stored"),
        (413, "Request body too large"), (422, "Malformed or invalid request"),
        (429, "Rate limited"))}
router = APIRouter(prefix="/api", tags=["api"], responses=ERRORS)

TaskId = Annotated[int, Path(ge=1, le=DB_INT_MAX)]
LabelId = Annotated[int, Path(ge=1, le=DB_INT_MAX)]


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


@router.get("/me", response_model=Me)
def me(user: CurrentUser, db: Store) -> Me:
    """Who you are and how many labels you have given."""
    page = annotation.my_labels(db, user, limit=1, offset=0)
    return Me(annotator_id=user.id, name=user.name, role=user.role.value, labels=page.total)


# The two hot routes are async and hand only the store work to the thread pool: a sync route
# costs two thread hops (FastAPI also validates a sync route's response in the pool).


@router.get("/tasks/next", response_model=NextTask)
async def next_task(request: Request, user: CurrentUser, db: Store,
                    kind: Literal["pairwise", "listwise", "binary"] = "pairwise") -> NextTask:
    """Lease the next task of `kind` to you, or return the one you already hold.

    Completions come in the order you must refer to them in (`a`/`b`, ranking indices)."""
    view = await run_in_threadpool(annotation.next_task, db, _settings(request), user,
                                   TaskKind(kind))
    if view is None:
        return NextTask(task=None, message=f"No {kind} tasks are waiting for you right now.")
    return NextTask(task=view)


@router.post("/tasks/{task_id}/labels", response_model=LabelOut, status_code=201,
             responses={200: {"model": LabelOut, "description": "Replayed"}})
async def submit_label(
    request: Request, response: Response, task_id: TaskId, body: LabelIn, user: CurrentUser,
    db: Store,
    idempotency_key: Annotated[str, Header(alias="Idempotency-Key", min_length=1,
                                           max_length=200, pattern=NO_NUL)],
) -> LabelOut:
    """Label a task leased to you. A retry with the same Idempotency-Key and body returns the
    stored label (200); the same key with another body is 422."""
    allowed, wait = request.app.state.submit_limiter.allow(str(user.id))
    if not allowed:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, "too many submits, slow down",
                            headers={"Retry-After": str(max(1, round(wait)))})
    out = await run_in_threadpool(
        functools.partial(annotation.submit_label, db, user, task_id, body,
                          idempotency_key=idempotency_key, request_id=_request_id(request)))
    if out.replayed:
        response.status_code = status.HTTP_200_OK
    return out


@router.post("/tasks/{task_id}/skip", status_code=204)
def skip_task(task_id: TaskId, user: CurrentUser, db: Store) -> Response:
    """Give back a task leased to you; you will not be offered it again."""
    annotation.skip_task(db, user, task_id)
    return Response(status_code=204)


@router.get("/me/labels", response_model=LabelsPage)
def my_labels(user: CurrentUser, db: Store,
              limit: Annotated[int, Query(ge=1, le=500)] = 50,
              offset: Annotated[int, Query(ge=0, le=DB_INT_MAX)] = 0) -> LabelsPage:
    """Your labels, newest first, in the order the completions were shown to you."""
    return annotation.my_labels(db, user, limit=limit, offset=offset)


@router.delete("/me/labels/{label_id}", status_code=204)
def undo_label(request: Request, label_id: LabelId, user: CurrentUser, db: Store) -> Response:
    """Undo one of your labels within the grace period; the task is yours again."""
    annotation.undo_label(db, _settings(request), user, label_id,
                          request_id=_request_id(request))
    return Response(status_code=204)


@router.post("/prompts", response_model=PromptOut, status_code=201)
def create_prompt(body: PromptIn, user: AdminUser, db: Store) -> PromptOut:
    """Admin: add a prompt (text or chat messages); the same prompt is stored once."""
    return annotation.create_prompt(db, body)


@router.post("/tasks", response_model=TaskOut, status_code=201)
def create_task(request: Request, body: TaskIn, user: AdminUser, db: Store) -> TaskOut:
    """Admin: create a task from completions of a prompt (optionally gold, with its answer)."""
    return annotation.create_task(db, _settings(request), body)


@router.get("/stats", response_model=Stats)
def stats(user: AdminUser, db: Store) -> Stats:
    """Admin: label counts by source, per-annotator throughput and gold accuracy, agreement."""
    return metrics.project_stats(db)
