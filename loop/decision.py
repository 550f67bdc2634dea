"""The promotion gate: the candidate's win rates from the eval verdicts, and promote or reject.

`tally_win_rates` and `promotion_decision` are pure (plain data in, plain data out);
`win_rates` reads the stored eval labels (store/rounds.py) and tallies them. The evaluate stage
records the win rates, the decide stage applies the decision.

    python -c "from loop.decision import promotion_decision as d; print(d(0.7, 8, threshold=0.55,
        min_decisive=6, ties='drop'))"
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlmodel import Session

from store import rounds as store_rounds
from store.models import LabelStatus


def tally_win_rates(verdicts: Iterable[tuple[int, str, bool, Any]],
                    candidate_first: Mapping[int, bool], *,
                    empty: Mapping[str, int] | None = None, judges: Sequence[str] = ()
                    ) -> dict[str, dict[str, float]]:
    """Per judge: wins, losses, ties, invalid, n, `win_rate` and `decisive_win_rate`.

    verdicts: (task id, judge name, valid, choice) per label; `candidate_first[task_id]` says
    whether canonical position a is the candidate. `empty` counts prompts where an answer was
    empty (not judged): an empty answer loses, two empty answers tie; they are added to every
    judge in `judges`.
    """
    tallies: dict[str, Counter[str]] = {name: Counter() for name in judges}
    for tally in tallies.values():
        tally["wins"] += (empty or {}).get("deployed_only", 0)
        tally["losses"] += (empty or {}).get("candidate_only", 0)
        tally["ties"] += (empty or {}).get("both", 0)
    for task_id, name, valid, choice in verdicts:
        tally = tallies.setdefault(name, Counter())
        if not valid:
            tally["invalid"] += 1
            continue
        if choice in ("tie", "both_bad"):
            tally["ties"] += 1
            continue
        candidate_won = (choice == "a") == candidate_first[task_id]
        tally["wins" if candidate_won else "losses"] += 1
    out = {}
    for name, tally in sorted(tallies.items()):
        n = tally["wins"] + tally["losses"] + tally["ties"]
        decisive = tally["wins"] + tally["losses"]
        out[name] = {"wins": tally["wins"], "losses": tally["losses"], "ties": tally["ties"],
                     "invalid": tally["invalid"], "n": n,
                     "win_rate": (tally["wins"] + 0.5 * tally["ties"]) / n if n else 0.5,
                     "decisive_win_rate": tally["wins"] / decisive if decisive else 0.5}
    return out


def win_rates(session: Session, task_ids: Sequence[int], candidate_first: Mapping[int, bool],
              *, empty: Mapping[str, int] | None = None, judges: Sequence[str] = ()
              ) -> dict[str, dict[str, float]]:
    """Per judge: the candidate's wins, losses, ties (tie + both_bad), `win_rate` (ties count
    half) and `decisive_win_rate` (wins / (wins + losses), ties dropped) on the eval tasks
    (`tally_win_rates` over their stored labels)."""
    verdicts = [(label.task_id, name, label.status == LabelStatus.submitted, label.choice)
                for label, name in store_rounds.labels_with_judges(session, task_ids)]
    return tally_win_rates(verdicts, candidate_first, empty=empty, judges=judges)


def promotion_decision(win_rate: float | None, decisive: int, *, threshold: float,
                       min_decisive: int, ties: str) -> tuple[bool, str]:
    """The gate: promote iff there is a win rate, at least `min_decisive` decisive verdicts
    (wins + losses) behind it, and it reaches `threshold`. Returns (promote, reason)."""
    if win_rate is None:
        return False, "no valid eval verdicts"
    if decisive < min_decisive:
        return False, f"{decisive} decisive verdicts < min_decisive {min_decisive}"
    promote = win_rate >= threshold
    return promote, f"win rate {win_rate:.3f} (ties {ties}) {'>=' if promote else '<'} {threshold}"
