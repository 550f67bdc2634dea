"""Request and response bodies of the REST API (pydantic), as OpenAPI publishes them.

Positions in these bodies are always *shown* positions: `a`/`b` and ranking indices refer to the
order in which `GET /api/tasks/next` returned the completions. The store keeps canonical ones.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

MAX_RATIONALE = 10_000
MAX_K = 16


# Text without NUL characters (PostgreSQL cannot store them in a text column).
NO_NUL = r"^[^\x00]*$"
DB_INT_MAX = 2**31 - 1


def text(min_length: int = 0, max_length: int = 200_000) -> Any:
    return Field(min_length=min_length, max_length=max_length, pattern=NO_NUL)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: Annotated[StrictStr, text()]


Content = Annotated[StrictStr, text(1)] | Annotated[
    list[Message], Field(min_length=1, max_length=200)]


class ShownCompletion(BaseModel):
    index: int = Field(description="Position as shown (0 = first / left / 'a').")
    content: str | list[Message]


class TaskView(BaseModel):
    task_id: int
    kind: Literal["pairwise", "listwise", "binary"]
    prompt: str | list[Message]
    completions: list[ShownCompletion]
    lease_expires_at: datetime
    resumed: bool = Field(description="True when this task was already leased to you.")


class NextTask(BaseModel):
    task: TaskView | None
    message: str | None = Field(default=None, description="Why there is no task, if none.")


RankEntry = StrictInt | Annotated[list[StrictInt], Field(min_length=1, max_length=MAX_K)]


class LabelIn(BaseModel):
    """Exactly one of `choice` (pairwise), `ranking` (listwise) or `value` (binary)."""

    model_config = ConfigDict(extra="forbid")
    choice: Literal["a", "b", "tie", "both_bad"] | None = None
    ranking: Annotated[list[RankEntry], Field(min_length=1, max_length=MAX_K)] | None = Field(
        default=None, description="Shown indices best to worst; a nested list is a tie group.")
    value: Literal["up", "down"] | None = None
    rationale: Annotated[StrictStr, text(0, MAX_RATIONALE)] | None = None


class LabelOut(BaseModel):
    label_id: int
    task_id: int
    kind: Literal["pairwise", "listwise", "binary"]
    choice: str | None = None
    ranking: list[int | list[int]] | None = None
    value: str | None = None
    rationale: str | None = None
    created_at: datetime
    replayed: bool = False


class LabelsPage(BaseModel):
    labels: list[LabelOut]
    total: int


class PromptIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content: Content
    dataset: Annotated[StrictStr, text(1, 200)] = "default"
    split: Annotated[StrictStr, text(1, 50)] = "train"
    reference: Annotated[StrictStr, text(0, 10_000)] | None = None


class PromptOut(BaseModel):
    prompt_id: int
    dataset: str
    split: str


class GoldIn(BaseModel):
    """The known answer of a gold task, in the order `completions` were given."""

    model_config = ConfigDict(extra="forbid")
    choice: Literal["a", "b", "tie", "both_bad"] | None = None
    ranking: Annotated[list[RankEntry], Field(min_length=1, max_length=MAX_K)] | None = None
    value: Literal["up", "down"] | None = None


class TaskIn(BaseModel):
    """A task over new or existing completions of one prompt (in this, the canonical, order)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["pairwise", "listwise", "binary"]
    prompt_id: Annotated[StrictInt, Field(ge=1, le=DB_INT_MAX)]
    completions: Annotated[list[Content], Field(min_length=1, max_length=MAX_K)]
    origin: Annotated[StrictStr, text(1, 200)] = "external:api"
    overlap: Annotated[StrictInt, Field(ge=1, le=50)] | None = None
    priority: Annotated[StrictInt, Field(ge=-1000, le=1000)] = 0
    gold: GoldIn | None = None
    source: Annotated[StrictStr, text(0, 250)] | None = None


class TaskOut(BaseModel):
    task_id: int
    kind: str
    created: bool
    completion_ids: list[int]
    overlap: int
    gold: bool


class Me(BaseModel):
    annotator_id: int
    name: str
    role: str
    labels: int


class Stats(BaseModel):
    counts: dict[str, int]
    labels_by_source: dict[str, int]
    annotators: list[dict[str, object]]
    agreement: dict[str, dict[str, object]]
    labels_per_hour: list[dict[str, object]]


class Problem(BaseModel):
    """An error: a message, or the list of validation errors for a malformed request."""

    detail: str | list[dict[str, Any]]


class Health(BaseModel):
    status: Literal["ok"]
    database: str
