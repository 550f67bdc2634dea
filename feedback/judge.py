"""The pure core of an LLM judge: orders, messages, strict verdict parsing, debiasing, flags.

Nothing here does I/O, so every rule is tested against hand-computed values
(tests/feedback/test_judge_core.py). feedback/plans.py builds each call's messages with these
functions and hands the raw outputs back to `parse_verdict` and `combine_*`; the batch runner
(feedback/batch.py) only sends the calls.

Bias mitigations and where they come from:
- Both orders for pairwise, inconsistent verdicts become a tie or go to humans: MT-Bench
  (Zheng et al. 2023, arXiv 2306.05685; FastChat `llm_judge`), which reports GPT-4 position
  consistency of only 65%.
- Listwise: rankings averaged over seeded shuffles of the shown order, as AlpacaEval randomises
  the output order per example and keeps the swap invertible (alpaca_eval `annotators`).
- Untrusted candidates: per-call random (nonce) delimiters, a strict whole-output JSON parser
  that never scans for verdict tokens (a `[[A]]` substring search can be steered by a candidate),
  and flags for responses that address the judge or carry the "master key" openers of
  Zhao et al. 2025 (arXiv 2507.08794: ":" or "Thought process:" alone win up to 80-90%).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations, permutations
from typing import Any

from feedback.rubric import Rubric

LETTERS = "ABCDEFGHIJKLMNOP"
PAIRWISE_VERDICTS = {"A": "a", "B": "b", "TIE": "tie", "BOTH_BAD": "both_bad"}
BINARY_VERDICTS = {"GOOD": "up", "BAD": "down"}


# ---------------------------------------------------------------------------------------------
# Orders: which canonical position is shown where, and back


def permute(items: Sequence[Any], shown_order: Sequence[int]) -> list[Any]:
    """Canonical items -> the order they are shown in (`shown_order[i]` is shown i-th)."""
    return [items[position] for position in shown_order]


def unpermute(shown_items: Sequence[Any], shown_order: Sequence[int]) -> list[Any]:
    """The inverse of `permute`: shown items -> canonical order."""
    out: list[Any] = [None] * len(shown_order)
    for shown_index, position in enumerate(shown_order):
        out[position] = shown_items[shown_index]
    return out


def seeded_orders(k: int, n: int, *, seed_material: str) -> list[tuple[int, ...]]:
    """`n` distinct shown orders of `k` items: canonical first, then the reverse, then seeded.

    The reverse comes second so that n=2 on a pair is exactly MT-Bench's (A, B) + (B, A). The
    rest are drawn from a generator seeded by `seed_material` (e.g. judge + task key), so a
    rerun shows the same orders.
    """
    total = math.factorial(k)
    n = min(n, total)
    orders: list[tuple[int, ...]] = [tuple(range(k))]
    if n >= 2:
        orders.append(tuple(reversed(range(k))))
    if n > len(orders):
        seed = int.from_bytes(hashlib.sha256(seed_material.encode()).digest()[:8], "big")
        rng = random.Random(seed)
        if total <= 720:
            rest = [p for p in permutations(range(k)) if p not in orders]
            rng.shuffle(rest)
            orders += rest[: n - len(orders)]
        else:
            seen = set(orders)
            while len(orders) < n:
                candidate = list(range(k))
                rng.shuffle(candidate)
                if tuple(candidate) not in seen:
                    seen.add(tuple(candidate))
                    orders.append(tuple(candidate))
    return orders


# ---------------------------------------------------------------------------------------------
# Messages


def make_nonce() -> str:
    """A fresh random delimiter code per call: a candidate cannot predict it to close its block."""
    return secrets.token_hex(8)


def conversation_text(content: Any) -> str:
    """A prompt as text: a string as is, chat messages as `role: content` lines."""
    if isinstance(content, str):
        return content
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in content)


def format_responses(shown_texts: Sequence[str], nonce: str) -> str:
    blocks = []
    for letter, text in zip(LETTERS, shown_texts, strict=False):
        blocks.append(f"<<<BEGIN RESPONSE {letter} {nonce}>>>\n{text}\n"
                      f"<<<END RESPONSE {letter} {nonce}>>>")
    return "\n\n".join(blocks)


def output_instructions(kind: str, k: int) -> str:
    """The answer format, stated in the prompt (and enforced by the schema where supported)."""
    if kind == "pairwise":
        return ('Reply with exactly one JSON object and nothing else:\n'
                '{"reasoning": "<two or three sentences>", "verdict": "A" | "B" | "tie" | '
                '"both_bad"}\n'
                'Use "tie" when they are equally good and "both_bad" when neither is '
                'acceptable.')
    if kind == "listwise":
        letters = ", ".join(f'"{c}"' for c in LETTERS[:k])
        return ('Reply with exactly one JSON object and nothing else:\n'
                '{"reasoning": "<two or three sentences>", "ranking": [<best>, ..., <worst>]}\n'
                f'where the ranking lists each of {letters} exactly once, best first.')
    return ('Reply with exactly one JSON object and nothing else:\n'
            '{"reasoning": "<two or three sentences>", "verdict": "good" | "bad"}')


def verdict_schema(kind: str, k: int) -> dict[str, Any]:
    """The JSON schema of a verdict, for endpoints that support structured output."""
    if kind == "pairwise":
        verdict: dict[str, Any] = {"type": "string", "enum": ["A", "B", "tie", "both_bad"]}
        key = "verdict"
    elif kind == "listwise":
        verdict = {"type": "array", "items": {"type": "string", "enum": list(LETTERS[:k])},
                   "minItems": k, "maxItems": k}
        key = "ranking"
    else:
        verdict = {"type": "string", "enum": ["good", "bad"]}
        key = "verdict"
    return {"type": "object", "properties": {"reasoning": {"type": "string"}, key: verdict},
            "required": ["reasoning", key], "additionalProperties": False}


def build_messages(rubric: Rubric, kind: str, *, question: str, shown_texts: Sequence[str],
                   nonce: str, principles: Sequence[str] = (),
                   reference: str | None = None,
                   answer_format: str | None = None) -> list[dict[str, str]]:
    """The chat messages for one judge call on candidates shown in this order (`answer_format`
    replaces the JSON answer instructions, e.g. with `label_instructions` for log-prob mode)."""
    principle_text = ""
    if principles:
        principle_text = "\nAlso weigh these principles:\n" + "\n".join(
            f"{i}. {p}" for i, p in enumerate(principles, start=1))
    system, user = rubric.render(
        kind, principles=principle_text, question=question,
        reference=reference if reference else "(none)",
        responses=format_responses(shown_texts, nonce), format=answer_format
        or output_instructions(kind, len(shown_texts)),
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


# ---------------------------------------------------------------------------------------------
# Strict parsing


@dataclass(frozen=True)
class ParsedVerdict:
    """One judge output, parsed. Values are in *shown* positions."""

    valid: bool
    error: str | None = None
    choice: str | None = None  # pairwise: a/b/tie/both_bad (a = shown first); binary: up/down
    ranking: tuple[int, ...] | None = None  # listwise: shown indices, best first
    reasoning: str | None = None
    value_offset: int | None = None  # where the verdict value starts in the raw text


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


_FENCE = re.compile(r"```(?:json)?[ \t]*\n(.*?)\n[ \t]*```", re.DOTALL)


def _normalise_space(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def parse_verdict(kind: str, k: int, text: str | None,
                  candidates: Sequence[str] = ()) -> ParsedVerdict:
    """Parse a judge's whole output as one verdict object, or say why it is invalid.

    Strict by design: the output must be exactly one JSON object (optionally inside one ```json
    fence) with the schema's keys and nothing else around it. There is no search for verdict
    tokens in prose, so text the judge quoted from a candidate can never become the verdict; an
    output that reproduces a candidate's text verbatim is refused as well.
    """
    if text is None or not text.strip():
        return ParsedVerdict(False, "empty")
    stripped = text.strip()
    body_start = text.index(stripped)
    fence = _FENCE.fullmatch(stripped)
    if fence is not None:
        body, body_start = fence.group(1), body_start + fence.start(1)
    else:
        body = stripped
    if not body.lstrip().startswith("{"):
        return ParsedVerdict(False, "not_json")
    try:
        obj = json.loads(body, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as exc:
        return ParsedVerdict(False, f"contradictory:duplicate_key:{exc}")
    except json.JSONDecodeError as exc:
        return ParsedVerdict(False, "trailing_text" if exc.msg == "Extra data" else "not_json")
    if not isinstance(obj, dict):
        return ParsedVerdict(False, "not_an_object")
    key = "ranking" if kind == "listwise" else "verdict"
    if set(obj) != {"reasoning", key}:
        return ParsedVerdict(False, f"wrong_keys:{','.join(sorted(obj))}")
    reasoning = obj["reasoning"]
    if not isinstance(reasoning, str):
        return ParsedVerdict(False, "reasoning_not_a_string")
    normalised = _normalise_space(body)
    if any(normalised in _normalise_space(c) for c in candidates):
        return ParsedVerdict(False, "copied_from_candidate")
    match = re.search(rf'(?<!\\)"{key}"\s*:\s*', body)
    offset = body_start + match.end() if match else None
    value = obj[key]
    if kind == "listwise":
        letters = LETTERS[:k]
        if (not isinstance(value, list) or len(value) != k
                or any(not isinstance(v, str) for v in value)):
            return ParsedVerdict(False, "ranking_not_a_list_of_letters")
        upper = [v.strip().upper() for v in value]
        if sorted(upper) != sorted(letters):
            return ParsedVerdict(False, "ranking_not_a_permutation")
        return ParsedVerdict(True, ranking=tuple(letters.index(v) for v in upper),
                             reasoning=reasoning, value_offset=offset)
    if not isinstance(value, str):
        return ParsedVerdict(False, "verdict_not_a_string")
    token = value.strip().upper().replace(" ", "_")
    table = PAIRWISE_VERDICTS if kind == "pairwise" else BINARY_VERDICTS
    if token not in table:
        return ParsedVerdict(False, "unknown_verdict")
    return ParsedVerdict(True, choice=table[token], reasoning=reasoning, value_offset=offset)


def token_confidence(tokens: Sequence[tuple[str, float]], text: str,
                     offset: int | None) -> float | None:
    """exp(logprob) of the token where the verdict value starts, or None if not alignable.

    `tokens` are (token text, logprob) pairs from the endpoint. They usually spell `text`
    exactly; some servers return tokens for more than the content (llama.cpp's server strips a
    ```json fence from the content but not from its log-prob tokens), so the content is looked
    up inside the tokens' text and the offset shifted by where it starts. Tokens that do not
    contain the content give None. The value starts with its opening quote for strings
    (`"A"`), so the token covering the first character after the quote is the verdict's own.
    """
    if offset is None or not tokens:
        return None
    spelled = "".join(t for t, _ in tokens)
    if spelled != text:
        core = text.strip()
        where = spelled.find(core) if core else -1
        if where < 0:
            return None
        offset += where - text.index(core)
        text = spelled
    if offset < len(text) and text[offset] in "\"[":
        offset += 1
        while offset < len(text) and text[offset] in ' "\n':
            offset += 1
    position = 0
    for token, logprob in tokens:
        if position <= offset < position + len(token):
            return math.exp(logprob) if math.isfinite(logprob) else None
        position += len(token)
    return None


# ---------------------------------------------------------------------------------------------
# Combining calls into one label


@dataclass(frozen=True)
class OrderResult:
    """One call's outcome: the order shown and the parsed verdict (in shown positions)."""

    shown_order: tuple[int, ...]
    verdict: ParsedVerdict
    confidence: float | None = None  # from logprobs, when available


@dataclass(frozen=True)
class Decision:
    """What the runner writes for one task: a canonical value, or an invalid label."""

    value: dict[str, Any] | None
    confidence: float | None
    shown_order: tuple[int, ...] | None
    details: dict[str, Any] = field(default_factory=dict)
    route: bool = False  # send the task to humans first

    @property
    def valid(self) -> bool:
        return self.value is not None


def pairwise_to_canonical(choice: str, shown_order: Sequence[int]) -> str:
    """'a' = the response shown first; map it to the canonical letter (a = position 0)."""
    if choice in ("a", "b"):
        return "a" if shown_order[0 if choice == "a" else 1] == 0 else "b"
    return choice


def _order_details(results: Sequence[OrderResult]) -> list[dict[str, Any]]:
    out = []
    for r in results:
        v = r.verdict
        out.append({"shown_order": list(r.shown_order), "valid": v.valid, "error": v.error,
                    "choice": v.choice, "ranking": list(v.ranking) if v.ranking else None,
                    "confidence": r.confidence})
    return out


def combine_pairwise(results: Sequence[OrderResult], *, on_inconsistent: str = "tie"
                     ) -> Decision:
    """Per-order verdicts -> one canonical label (MT-Bench: keep only consistent verdicts).

    Any invalid output makes the label invalid (never guessed). Orders that agree give their
    verdict with the mean per-order confidence (1.0 per order without logprobs); orders that
    disagree give a tie with confidence 0, or no verdict and a route to humans.
    """
    details: dict[str, Any] = {"orders": _order_details(results)}
    if not results or any(not r.verdict.valid for r in results):
        errors = [r.verdict.error for r in results if not r.verdict.valid]
        return Decision(None, None, results[0].shown_order if results else None,
                        {**details, "reason": "invalid_output", "errors": errors})
    canonical = [pairwise_to_canonical(r.verdict.choice or "", r.shown_order) for r in results]
    first = results[0].shown_order
    if len(set(canonical)) == 1:
        confidences = [1.0 if r.confidence is None else r.confidence for r in results]
        details["consistent"] = True
        return Decision({"choice": canonical[0]}, sum(confidences) / len(confidences), first,
                        details)
    details["consistent"] = False
    if on_inconsistent == "human":
        return Decision(None, None, first, {**details, "reason": "position_inconsistent"},
                        route=True)
    return Decision({"choice": "tie"}, 0.0, first, {**details, "reason": "position_inconsistent"})


def ranking_to_dense_ranks(ranking_shown: Sequence[int], shown_order: Sequence[int]
                           ) -> list[int]:
    """A best-first list of shown indices -> the 1-based rank of each canonical position."""
    ranks = [0] * len(shown_order)
    for rank, shown_index in enumerate(ranking_shown, start=1):
        ranks[shown_order[shown_index]] = rank
    return ranks


def average_rankings(rankings: Sequence[Sequence[int]]) -> tuple[list[int], float]:
    """Mean rank per canonical position -> dense ranks (equal means tie), and a confidence.

    The confidence is the mean, over position pairs, of the share of rankings that order the
    pair as the average does (1.0 when every shuffle gave the same ranking).
    """
    k = len(rankings[0])
    means = [sum(r[i] for r in rankings) / len(rankings) for i in range(k)]
    distinct = sorted(set(means))
    ranks = [distinct.index(m) + 1 for m in means]

    def relation(r: Sequence[int], i: int, j: int) -> int:
        return (r[i] > r[j]) - (r[i] < r[j])

    shares = [sum(relation(r, i, j) == relation(ranks, i, j) for r in rankings) / len(rankings)
              for i, j in combinations(range(k), 2)]
    return ranks, sum(shares) / len(shares)


def combine_listwise(results: Sequence[OrderResult]) -> Decision:
    """Permutation-averaged ranking over the shuffles; any invalid shuffle makes it invalid."""
    details: dict[str, Any] = {"orders": _order_details(results)}
    if not results or any(not r.verdict.valid or r.verdict.ranking is None for r in results):
        errors = [r.verdict.error for r in results if not r.verdict.valid]
        return Decision(None, None, results[0].shown_order if results else None,
                        {**details, "reason": "invalid_output", "errors": errors})
    per_order = [ranking_to_dense_ranks(r.verdict.ranking or (), r.shown_order)
                 for r in results]
    ranks, confidence = average_rankings(per_order)
    details["canonical_ranks"] = per_order
    return Decision({"ranks": ranks}, confidence, results[0].shown_order, details)


def combine_binary(results: Sequence[OrderResult]) -> Decision:
    details: dict[str, Any] = {"orders": _order_details(results)}
    if len(results) != 1 or not results[0].verdict.valid:
        errors = [r.verdict.error for r in results if not r.verdict.valid]
        return Decision(None, None, (0,), {**details, "reason": "invalid_output",
                                           "errors": errors})
    result = results[0]
    return Decision({"choice": result.verdict.choice}, result.confidence, (0,), details)


# ---------------------------------------------------------------------------------------------
# Injection flagging

_I = re.IGNORECASE | re.MULTILINE
INJECTION_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    # MT-Bench-style verdict tokens and judge-shaped JSON.
    ("verdict_token", re.compile(r"\[\[\s*(?:[A-P]|tie|both[ _]bad)\s*\]\]", _I)),
    ("verdict_json", re.compile(
        r"[\"']?\b(?:verdict|winner|ranking|preferred|better_response)\b[\"']?\s*[:=]\s*"
        r"[\[\"']*\s*(?:[A-P]\b|tie\b|both|good\b|bad\b|response|assistant)", _I)),
    ("verdict_phrase", re.compile(
        r"\b(?:final|my|judge'?s?|official)\s+verdict\b|\bverdict\s*:", _I)),
    # Instructions aimed at the evaluator.
    ("judge_instruction", re.compile(
        r"\b(?:ignore|disregard|forget|override|bypass)\b[^.\n]{0,40}"
        r"\b(?:rubric|instructions?|guidelines|criteria|system prompt|rules|evaluation)\b", _I)),
    ("prefer_me", re.compile(
        r"\b(?:prefer|choose|select|pick|favou?r|rank|rate|score)\s+(?:this|my|me)\b"
        r"[^.\n]{0,30}\b(?:answer|response|reply|output|first|best|highest|winner)\b", _I)),
    ("addresses_judge", re.compile(
        r"\b(?:dear|attention|note\s+to(?:\s+the)?|hey|to\s+the)\s+"
        r"(?:judge|evaluator|grader|annotator|reviewer|assessor|reward\s+model)s?\b"
        r"|\byou\s+(?:are|as)\s+(?:the|an?)\s+(?:judge|evaluator|grader)\b"
        r"|\b(?:judges?|evaluators?|graders?)\s+(?:must|should)\s+"
        r"(?:prefer|choose|select|pick|rate|score|rank)\b", _I)),
    # A fake judge reasoning block: comparing "Response A/B" is the judge's job, not an answer's.
    ("compares_responses", re.compile(
        r"\b(?:response|assistant|candidate)\s+[A-P]\b[^\n]{0,80}"
        r"\b(?:better|worse|superior|inferior|wins?|preferred|stronger|weaker)\b", _I)),
    ("fake_reasoning", re.compile(
        r"^\s*(?:#+\s*)?(?:thought\s+process|judge'?s?\s+(?:reasoning|analysis|evaluation)|"
        r"evaluator'?s?\s+(?:reasoning|notes?)|evaluation\s+reasoning)\s*:?\s*$"
        r"|<\s*/?\s*(?:judge|evaluation|verdict)[^>]*>", _I)),
    ("role_marker", re.compile(
        r"^\s*(?:system|assistant)\s*:\s|<\|im_start\|>|<\|(?:system|assistant|user)\|>"
        r"|\[/?INST\]|<\|eot_id\|>", _I)),
    ("delimiter_spoof", re.compile(r"<<<\s*(?:BEGIN|END)\s+RESPONSE", _I)),
)

# "Master key" responses (arXiv 2507.08794): a bare reasoning opener or punctuation, no content.
MASTER_KEYS = frozenset({
    "thought process", "let's solve this problem step by step", "let us think step by step",
    "let's think step by step", "solution", "answer", "reasoning", "step 1", "first",
    "sure", "sure, here is the answer", "i will solve this", "let me think", "解", "解答",
})


def flag_injection(text: str) -> tuple[str, ...]:
    """Names of the judge-manipulation patterns found in a candidate response (empty if none)."""
    flags = [name for name, pattern in INJECTION_PATTERNS if pattern.search(text)]
    bare = re.sub(r"[\s.:;,!?\-*#]+$", "", text.strip().lower()).strip()
    if not re.search(r"\w", text) or bare in MASTER_KEYS:
        flags.append("master_key")
    return tuple(flags)
