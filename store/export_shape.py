"""One shape per export file: every row plain text, or every row conversational.

TRL knows two dataset types, "standard" (strings) and "conversational" (lists of
{"role", "content"} messages), and its trainers pick one code path per dataset from the first
row: a file that mixes them (importing examples/*.jsonl gives one) crashes DPOTrainer and
KTOTrainer with `'list' object has no attribute 'endswith'`. So an export converts every row to
one shape, chosen by `--shape`:

- `chat`: every row conversational. A text prompt becomes one user turn, a text completion one
  assistant turn (the form the store already uses for a text completion of a chat prompt).
- `text`: only plain-text rows; conversational rows are dropped and counted as
  `skipped_conversational`, because flattening messages to text needs the model's chat
  template, which the store does not know.
- `auto` (the default): `chat` if any kept row is conversational, else `text`. It never drops a
  row, and an export of text only is byte-for-byte what it was before shapes existed.

The manifest records the requested shape (in `filters`) and the one the file has (`shape`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

from store.errors import InvalidInput

ExportShape = Literal["auto", "text", "chat"]
SHAPES: tuple[str, ...] = ("auto", "text", "chat")

# The row fields that hold one completion, and the one that holds a list of them (listwise).
COMPLETION_FIELDS = ("chosen", "rejected", "completion")
COMPLETION_LIST_FIELD = "completions"


def check_shape(shape: str) -> None:
    if shape not in SHAPES:
        raise InvalidInput(f"shape must be one of {', '.join(SHAPES)}")


def is_conversational(row: dict[str, Any]) -> bool:
    """A row is conversational when its prompt is a list of messages (TRL's own test)."""
    return isinstance(row["prompt"], list)


def user_turn(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def assistant_turn(completion: Any) -> Any:
    if isinstance(completion, list):
        return completion
    return [{"role": "assistant", "content": completion}]


def as_chat(row: dict[str, Any]) -> dict[str, Any]:
    """A text row as a conversational one (a conversational row is returned unchanged)."""
    if is_conversational(row):
        return row
    converted = {**row, "prompt": user_turn(row["prompt"])}
    for name in COMPLETION_FIELDS:
        if name in converted:
            converted[name] = assistant_turn(converted[name])
    if COMPLETION_LIST_FIELD in converted:
        converted[COMPLETION_LIST_FIELD] = [assistant_turn(c)
                                            for c in converted[COMPLETION_LIST_FIELD]]
    return converted


def resolve_shape(rows: list[dict[str, Any]], shape: str) -> str:
    """The shape the file will have: `shape`, or for `auto` the one its rows need."""
    check_shape(shape)
    if shape != "auto":
        return shape
    return "chat" if any(is_conversational(row) for row in rows) else "text"


def shape_rows(rows: list[dict[str, Any]], shape: str, counts: Counter[str]
               ) -> tuple[list[dict[str, Any]], str]:
    """The rows in one shape, and that shape ("text" or "chat"); counts what was changed."""
    resolved = resolve_shape(rows, shape)
    if resolved == "text":
        kept = [row for row in rows if not is_conversational(row)]
        if len(kept) < len(rows):
            counts["skipped_conversational"] += len(rows) - len(kept)
        return kept, resolved
    converted = sum(1 for row in rows if not is_conversational(row))
    if converted:
        counts["converted_to_chat"] += converted
    return [as_chat(row) for row in rows], resolved
