"""What a judge run counts, and the progress bar that shows it.

    prefloop judge run --judge judges/pairwise.toml          # the bar; --json prints RunStats

`RunStats` is filled by the batch runner (feedback/batch.py) and the ensemble combiner
(feedback/ensemble.py); `RichProgress` draws rate, ETA, invalid count and spend on stderr.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class RunStats:
    """The counts of one judge run (printed by `prefloop judge run`, `--json` for all)."""

    annotator_id: int = 0
    annotator_name: str = ""
    tasks_pending: int = 0
    written: int = 0  # labels stored (valid + invalid)
    valid: int = 0
    invalid: int = 0
    inconsistent: int = 0  # pairwise orders disagreed (tie or routed)
    flagged: int = 0  # tasks with a candidate flagged as an injection attempt
    routed: int = 0  # tasks whose priority was raised for humans
    already_labelled: int = 0  # another run wrote the label first
    failed: int = 0  # gave up (retries exhausted, request budget): left for a rerun
    requests: int = 0  # HTTP attempts, retries included
    retries: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    invalid_reasons: Counter[str] = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    spend_usd: float = 0.0
    max_call_s: float = 0.0
    elapsed_s: float = 0.0
    stopped: str | None = None  # why the run stopped early, if it did

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["errors"] = dict(self.errors)
        out["invalid_reasons"] = dict(self.invalid_reasons)
        return out


class Progress(Protocol):
    """Whatever shows a run's progress; the runner calls update after every stored batch."""

    def start(self, total: int, description: str) -> None: ...

    def update(self, stats: RunStats) -> None: ...

    def stop(self) -> None: ...


class RichProgress:
    """A progress bar with rate, ETA, invalid count and spend (rich, on stderr)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichBar

        self._bar = RichBar(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[speed_text]}"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), TextColumn("invalid {task.fields[invalid]}"),
            TextColumn("${task.fields[spend]:.4f}"), console=Console(stderr=True),
        )
        self._task: Any = None

    def start(self, total: int, description: str) -> None:
        self._bar.start()
        self._task = self._bar.add_task(description, total=total, invalid=0, spend=0.0,
                                        speed_text="")

    def update(self, stats: RunStats) -> None:
        done = stats.written + stats.already_labelled + stats.failed
        task = self._bar.tasks[0]
        speed = f"{task.speed:.1f} labels/s" if task.speed else ""
        self._bar.update(self._task, completed=done, invalid=stats.invalid,
                         spend=stats.spend_usd, speed_text=speed)

    def stop(self) -> None:
        self._bar.stop()


__all__ = ["Progress", "RichProgress", "RunStats"]
