"""`prefloop plot RUN_DIR` draws the curves of a run to PNG."""

from __future__ import annotations

import json

import pytest

from training.plot import plot_run


def test_plot_run_writes_a_png_with_the_logged_curves(tmp_path):
    rows = [{"step": s, "train/loss": 0.69 - 0.05 * s, "train/rewards/margin": 0.1 * s,
             "train/rewards/accuracy": min(1.0, 0.2 * s)} for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = plot_run(tmp_path)
    assert path == tmp_path / "curves.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_plot_run_on_a_folder_without_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl"):
        plot_run(tmp_path)
