"""Reading an import file and checking its rows, before anything is written (store/importing.py).

Two steps, both pure (no database): `read_jsonl` turns each non-blank line into a JSON object or
a `RowError` (bad bytes, bad JSON, text the store cannot keep), and the `plan_*` functions turn
one object into a `RowPlan`: the prompt, completions, task and label the row stands for, every
value already validated the way store/repo.py validates it, in the order the checks used to run
one row at a time, so a row with several problems is reported with the same first problem.

The one check that needs the store's state, who an annotator is, is answered by an
`AnnotatorBook` the caller fills from the database; duplicate labels are found when writing
(store/bulk.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from store.errors import InvalidInput
from store.models import AnnotatorKind, TaskKind
from store.repo import EXPECTED_COMPLETIONS, MAX_RATIONALE_CHARS, normalise_label_value
from store.values import content_hash, ranking_to_ranks, ratings_to_ranks, validate_content

# Real rows nest 4 deep (row -> messages -> message -> text); anything far deeper is an attack
# or a bug, and Python's JSON decoder would hit its recursion limit near 1000.
MAX_DEPTH = 64
MAX_OVERLAP = 50  # as the API's task creation (app/schemas.py)
DATASET_CHARS, SPLIT_CHARS = 200, 50  # the columns' lengths (store/models.py)
# A lone surrogate can only come from a \uD800-\uDFFF escape (strict UTF-8 decoding refuses
# encoded ones) and a NUL only from \u0000 (JSON refuses raw control characters), so lines
# without these escapes skip the walk over every string.
_SUSPECT_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F][0-9a-fA-F]{2})")


@dataclass(frozen=True)
class RowError:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


# ---------------------------------------------------------------------------------------------
# Lines to objects


class _Constant(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _Constant(f"{name} is not a JSON number")


def text_problem(text: str) -> str | None:
    """Why the store cannot keep `text` (a NUL, a lone surrogate), or None."""
    if "\x00" in text:
        return "contains a NUL character (\\u0000), which the store cannot keep"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"contains a lone surrogate (\\u{ord(text[exc.start]):04x}), "
                f"which is not valid Unicode")
    return None


def _bad_text(row: dict[str, Any]) -> str | None:
    """The first string of the row (in document order) the store cannot keep, named by path."""
    stack: list[tuple[Any, str]] = [(row, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            problem = text_problem(value)
            if problem:
                return f"{where} {problem}"
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                problem = text_problem(key)
                if problem:
                    return f"a field name {problem}"
                stack.append((item, f"{where}.{key}" if where else key))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]") for i, item in reversed(list(enumerate(value))))
    return None


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in
                         (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_line(number: int, raw: bytes) -> dict[str, Any] | RowError:
    """One line's object, or why it cannot be imported."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RowError(number, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte "
                                f"{exc.start + 1} of the line)")
    if number == 1:
        text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
    try:
        row = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        return RowError(number, f"nested deeper than {MAX_DEPTH} levels")
    except json.JSONDecodeError as exc:
        return RowError(number, f"not valid JSON ({exc.msg})")
    except _Constant as exc:
        return RowError(number, f"not valid JSON ({exc})")
    except ValueError:  # an integer of more digits than Python converts (sys.int_info)
        return RowError(number, "not valid JSON (a number has too many digits)")
    if not isinstance(row, dict):
        return RowError(number, "a row must be a JSON object")
    if text.count("[") + text.count("{") > MAX_DEPTH and _depth(row) > MAX_DEPTH:
        return RowError(number, f"nested deeper than {MAX_DEPTH} levels")
    if _SUSPECT_ESCAPE.search(text):
        problem = _bad_text(row)
        if problem:
            return RowError(number, problem)
    return row


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    """Yield (line number, row or error) for each non-blank line."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                yield number, parse_line(number, raw)


# ---------------------------------------------------------------------------------------------
# Who an annotator is


@dataclass
class KnownAnnotator:
    id: int | None  # None until the writer creates it
    kind: AnnotatorKind
    account: bool = False  # a person's account: a human who has (or had) an API token
    judge: bool = False    # a judge configured in the store (it has a model or a config)


@dataclass
class AnnotatorBook:
    """The annotators an import has seen: read from the store, or to be created by it."""

    known: dict[str, KnownAnnotator] = field(default_factory=dict)

    def check(self, name: str, kind: AnnotatorKind) -> None:
        found = self.known.get(name)
        if found is None:
            return
        if found.kind != kind:
            raise InvalidInput(
                f"annotator {name!r} exists with kind {found.kind.value}, not {kind.value}")
        if found.account:
            raise InvalidInput(
                f"annotator {name!r} is a person's account; an import cannot write labels in "
                f"a person's name (name the import's own annotator instead)")
        if found.judge:
            raise InvalidInput(
                f"annotator {name!r} is a judge configured in this store; an import cannot "
                f"write labels in its name (name the import's own annotator instead)")

    def adopt(self, name: str, kind: AnnotatorKind) -> None:
        self.known.setdefault(name, KnownAnnotator(None, kind))


# ---------------------------------------------------------------------------------------------
# Rows to plans


@dataclass(frozen=True)
class PromptPlan:
    content: Any
    hash: str
    dataset: str
    split: str
    reference: str | None


@dataclass(frozen=True)
class LabelPlan:
    annotator: str
    annotator_kind: AnnotatorKind
    # The answer in the row's order of completions: pairwise, the first (chosen) won; binary,
    # `choice`; listwise, `ranks` and maybe `ratings`. store/bulk.py maps it to the task's order.
    choice: str | None
    ranks: list[int] | None
    ratings: list[Any] | None
    rationale: str | None
    confidence: float | None


@dataclass(frozen=True)
class RowPlan:
    line: int
    prompt: PromptPlan
    kind: TaskKind | None = None  # None: a prompt only
    completions: tuple[tuple[Any, str], ...] = ()  # (content, hash) in the row's order
    overlap: int = 1
    gold: dict[str, Any] | None = None
    label: LabelPlan | None = None


@dataclass(frozen=True)
class PlanContext:
    source: str
    annotator_kind: AnnotatorKind
    dataset: str | None
    split: str | None
    overlap: int
    book: AnnotatorBook


def _require(row: dict[str, Any], name: str) -> Any:
    if name not in row or row[name] is None:
        raise InvalidInput(f"missing field {name!r}")
    return row[name]


def _prompt_tags(ctx: PlanContext, row: dict[str, Any]) -> tuple[str, str, str | None]:
    dataset = row.get("dataset") or ctx.dataset or "default"
    split = row.get("split") or ctx.split or "train"
    if not isinstance(dataset, str) or not isinstance(split, str):
        raise InvalidInput("dataset and split must be strings")
    if len(dataset) > DATASET_CHARS or len(split) > SPLIT_CHARS:
        raise InvalidInput(f"dataset must have at most {DATASET_CHARS} characters and split "
                           f"at most {SPLIT_CHARS}")
    reference = row.get("reference")
    if reference is not None and not isinstance(reference, str | int | float):
        raise InvalidInput("reference must be a string or a number")
    return dataset, split, None if reference is None else str(reference)


def _prompt(ctx: PlanContext, row: dict[str, Any], content: Any = None) -> PromptPlan:
    dataset, split, reference = _prompt_tags(ctx, row)
    if content is None:
        content = validate_content(_require(row, "prompt"), what="prompt")
    return PromptPlan(content, content_hash(content), dataset, split, reference)


def _completion(content: Any, what: str) -> tuple[Any, str]:
    clean = validate_content(content, what=what)
    return clean, content_hash(clean)


def split_implicit_prompt(chosen: list[dict[str, str]], rejected: list[dict[str, str]]
                          ) -> tuple[list[dict[str, str]], list[dict[str, str]],
                                     list[dict[str, str]]]:
    """trl-lib's conversational shape without a prompt: the turns chosen and rejected share
    are the prompt, and each must then have exactly one turn left, an assistant turn."""
    shared = 0
    for mine, theirs in zip(chosen, rejected, strict=False):
        if mine != theirs:
            break
        shared += 1
    if shared == len(chosen) == len(rejected):
        raise InvalidInput("chosen and rejected are identical")
    if shared == 0:
        raise InvalidInput("chosen and rejected share no leading turns, so they hold no prompt "
                           "(add a 'prompt' field)")
    for what, turns in (("chosen", chosen), ("rejected", rejected)):
        rest = turns[shared:]
        if not rest:
            raise InvalidInput(f"{what} has no turn of its own after the {shared} turn(s) it "
                               f"shares with the other")
        if len(rest) > 1:
            raise InvalidInput(f"chosen and rejected part at turn {shared} ({what}[{shared}]) "
                               f"but {what} goes on for {len(rest)} turns; only the last, "
                               f"assistant turn may differ")
        if rest[0]["role"] != "assistant":
            raise InvalidInput(f"{what}[{shared}] is a {rest[0]['role']} turn; the turn after "
                               f"the shared prompt must be an assistant turn")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _check_task(kind: TaskKind, completions: list[tuple[Any, str]], overlap: int) -> None:
    """get_or_create_task's checks, in its order."""
    if len({digest for _, digest in completions}) != len(completions):
        raise InvalidInput("the same completion appears twice in one row")
    low, high = EXPECTED_COMPLETIONS[kind]
    if not low <= len(completions) <= high:
        raise InvalidInput(f"a {kind.value} task needs {low}-{high} completions, "
                           f"got {len(completions)}")
    if overlap < 1:
        raise InvalidInput("overlap must be at least 1")


def _label(ctx: PlanContext, row: dict[str, Any], *, choice: str | None = None,
           ranks: list[int] | None = None, ratings: list[Any] | None = None) -> LabelPlan:
    name = row.get("annotator") or ctx.source
    kind_name = row.get("annotator_kind") or ctx.annotator_kind.value
    if not isinstance(name, str):
        raise InvalidInput("annotator must be a string")
    if not isinstance(kind_name, str) or kind_name not in AnnotatorKind.__members__:
        raise InvalidInput("annotator_kind must be one of human, ai, rule")
    if len(name) > 200:
        raise InvalidInput("an annotator name must have 1 to 200 characters")
    kind = AnnotatorKind(kind_name)
    ctx.book.check(name, kind)
    confidence, rationale = row.get("confidence"), row.get("rationale")
    if confidence is not None and (isinstance(confidence, bool)
                                   or not isinstance(confidence, int | float)):
        raise InvalidInput("confidence must be a number between 0 and 1")
    if rationale is not None and not isinstance(rationale, str):
        raise InvalidInput("rationale must be a string")
    if rationale is not None and len(rationale) > MAX_RATIONALE_CHARS:
        raise InvalidInput(f"rationale is longer than {MAX_RATIONALE_CHARS} characters")
    if confidence is not None and not 0.0 <= confidence <= 1.0:
        raise InvalidInput("confidence must be between 0 and 1")
    return LabelPlan(name, kind, choice, ranks, ratings, rationale, confidence)


def plan_prompts(ctx: PlanContext, line: int, row: dict[str, Any]) -> RowPlan:
    return RowPlan(line, _prompt(ctx, row))


def plan_pairwise(ctx: PlanContext, line: int, row: dict[str, Any]) -> RowPlan:
    chosen_raw, rejected_raw = row.get("chosen"), row.get("rejected")
    if (row.get("prompt") is None and isinstance(chosen_raw, list)
            and isinstance(rejected_raw, list)):
        _prompt_tags(ctx, row)  # the row's tags are checked first, as for any row
        chosen_all = validate_content(chosen_raw, what="chosen")
        rejected_all = validate_content(rejected_raw, what="rejected")
        assert isinstance(chosen_all, list) and isinstance(rejected_all, list)
        shared, chosen_turn, rejected_turn = split_implicit_prompt(chosen_all, rejected_all)
        prompt = _prompt(ctx, row, content=shared)
        chosen, rejected = _completion(chosen_turn, "chosen"), _completion(rejected_turn,
                                                                           "rejected")
    else:
        prompt = _prompt(ctx, row)
        chosen = _completion(_require(row, "chosen"), "chosen")
        rejected = _completion(_require(row, "rejected"), "rejected")
    if chosen[1] == rejected[1]:
        raise InvalidInput("chosen and rejected are identical")
    _check_task(TaskKind.pairwise, [chosen, rejected], ctx.overlap)
    return RowPlan(line, prompt, TaskKind.pairwise, (chosen, rejected), ctx.overlap,
                   label=_label(ctx, row))


def _completions(row: dict[str, Any]) -> list[tuple[Any, str]]:
    completions = _require(row, "completions")
    if not isinstance(completions, list):
        raise InvalidInput("completions must be a list")
    return [_completion(c, f"completions[{i}]") for i, c in enumerate(completions)]


def _ratings(ratings: Any, k: int) -> list[int]:
    ranks = ratings_to_ranks(ratings, k)
    try:
        [float(r) for r in ratings]  # the label stores them as floats
    except OverflowError:
        raise InvalidInput("ratings must be numbers a float can hold") from None
    return ranks


def plan_listwise(ctx: PlanContext, line: int, row: dict[str, Any]) -> RowPlan:
    prompt = _prompt(ctx, row)
    completions = _completions(row)
    has_ranking, has_ratings = row.get("ranking") is not None, row.get("ratings") is not None
    if has_ranking == has_ratings:
        raise InvalidInput("a listwise row needs exactly one of 'ranking' or 'ratings'")
    k = len(completions)
    if has_ranking:
        ranks, ratings = ranking_to_ranks(row["ranking"], k), None
    else:
        ranks, ratings = _ratings(row["ratings"], k), row["ratings"]
    _check_task(TaskKind.listwise, completions, ctx.overlap)
    return RowPlan(line, prompt, TaskKind.listwise, tuple(completions), ctx.overlap,
                   label=_label(ctx, row, ranks=ranks, ratings=ratings))


BINARY_VALUES: dict[Any, str] = {True: "up", False: "down", "up": "up", "down": "down"}


def plan_binary(ctx: PlanContext, line: int, row: dict[str, Any]) -> RowPlan:
    prompt = _prompt(ctx, row)
    completion = _completion(_require(row, "completion"), "completion")
    label = _require(row, "label")
    if not isinstance(label, bool | str) or label not in BINARY_VALUES:
        raise InvalidInput("label must be true/false or 'up'/'down'")
    _check_task(TaskKind.binary, [completion], ctx.overlap)
    return RowPlan(line, prompt, TaskKind.binary, (completion,), ctx.overlap,
                   label=_label(ctx, row, choice=BINARY_VALUES[label]))


def plan_tasks(ctx: PlanContext, line: int, row: dict[str, Any]) -> RowPlan:
    kind_name = _require(row, "kind")
    if not isinstance(kind_name, str) or kind_name not in TaskKind.__members__:
        raise InvalidInput("kind must be one of pairwise, listwise, binary")
    overlap = row.get("overlap")
    if overlap is not None and (isinstance(overlap, bool) or not isinstance(overlap, int)
                                or not 1 <= overlap <= MAX_OVERLAP):
        raise InvalidInput(f"overlap must be an integer from 1 to {MAX_OVERLAP}")
    overlap = overlap or ctx.overlap
    prompt = _prompt(ctx, row)
    completions = _completions(row)
    kind = TaskKind(kind_name)
    _check_task(kind, completions, overlap)
    gold = row.get("gold")
    if gold is not None:
        gold = normalise_label_value(kind, len(completions), gold)
    return RowPlan(line, prompt, kind, tuple(completions), overlap, gold)
