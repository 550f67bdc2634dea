"""Draw a run's training curves (loss, reward margin, reward accuracy) from its metrics.jsonl.

    python -c "from training.plot import plot_run; print(plot_run('runs/dpo1'))"
"""

from __future__ import annotations

import json
from pathlib import Path

PANELS = (("train/loss", "loss"), ("train/rewards/margin", "reward margin"),
          ("train/rewards/accuracy", "reward accuracy"))


def read_metrics(run_dir: Path | str) -> list[dict]:
    """The logged steps of a run, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a prefloop run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Write `RUN_DIR/curves.png` (or `out`) with one panel per logged curve; returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}: metrics.jsonl is empty")
    panels = [(key, title) for key, title in PANELS if any(key in r for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50
                else None)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    target = Path(out) if out is not None else Path(run_dir) / "curves.png"
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target
