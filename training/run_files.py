"""The run folder's bookkeeping, shared by every trainer: metrics files, the git sha, resume checks.

`prefloop train {sft,rm,dpo,kto}`, the online algorithms and PPO all write `metrics.jsonl` (one
JSON record per step), record the git commit in `run.json`, and refuse to resume a run whose
config changed; the pieces are here once.

    python -c "from training.run_files import git_sha; print(git_sha())"
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


class TrainingError(RuntimeError):
    """A run that cannot continue (e.g. resuming with a different config)."""


def git_sha() -> str | None:
    """The commit of this checkout (None outside git, or if git is missing or hangs)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def append_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Append one JSON line per record."""
    with path.open("a") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def truncate_jsonl(path: Path, step: int) -> None:
    """Drop the records of steps after `step` (a resumed or replayed run writes them again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


def changed_config_keys(saved: Path, now: dict[str, Any], ignored: Iterable[str]) -> list[str]:
    """The keys whose value differs between the saved config.json and `now` (none if unsaved),
    leaving out the `ignored` ones that may change on resume (progress bars, checkpoint cadence)."""
    if not saved.exists():
        return []
    before = json.loads(saved.read_text())
    skip = set(ignored)
    return sorted(k for k in now if k not in skip and before.get(k) != now[k])


__all__ = ["TrainingError", "append_jsonl", "changed_config_keys", "git_sha", "truncate_jsonl"]
