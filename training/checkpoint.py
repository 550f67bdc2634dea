"""Resumable checkpoints, published atomically.

Layout of a run directory (`--out DIR`):

    DIR/config.json            resolved TrainConfig
    DIR/run.json               data file, its sha256 (manifest hash), counts, final step
    DIR/metrics.jsonl          one JSON object per logged step
    DIR/ref_logps.pt           reference log-probs, computed once (reused on resume)
    DIR/model/                 final weights (full or LoRA adapter) + tokenizer: from_pretrained
    DIR/checkpoints/step-00000010/{model/, trainer_state.pt, COMPLETE}

A checkpoint is written into a hidden temporary folder next to its final place, the COMPLETE
marker is written last, and the folder is renamed into place (same filesystem, so the rename is
atomic). A crash mid-save leaves only a `.tmp-*` folder, which resume ignores and the next save
removes (cf. huggingface/transformers PR #27820 and PR #35580). In a multi-process DeepSpeed run
rank 0 stages the folder (`begin_checkpoint` with `shared_staging_folder`), every rank writes its
DeepSpeed shard into it, and rank 0 alone writes the model and publishes (`publish_checkpoint`),
with barriers in between.

Training II reuses this format: `save_checkpoint` takes any picklable `state` dict.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.pt"


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(
    run_dir: Path,
    step: int,
    save_model: Any,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep` complete ones.

    Args:
        run_dir: the run directory.
        step: optimizer steps done.
        save_model: callable(folder) that writes a from_pretrained-loadable model there.
        state: trainer state (optimizer, scheduler, RNG, trainable weights, counters).
        keep: how many complete checkpoints to keep.
    """
    tmp = begin_checkpoint(run_dir, step)
    save_model(tmp / "model")
    return publish_checkpoint(run_dir, step, tmp, state, keep)


def shared_staging_folder(run_dir: Path, step: int) -> Path:
    """The temporary folder of checkpoint `step` when several processes write into it.

    A multi-process (DeepSpeed) run needs one name that every rank can compute without talking to
    the others; a single process uses a random `mkdtemp` name instead. Both start with `.tmp-`, so
    resume ignores them and the next save removes them.
    """
    return checkpoint_root(run_dir) / f".tmp-step-{step:08d}-shared"


def begin_checkpoint(run_dir: Path, step: int, folder: Path | None = None) -> Path:
    """Remove leftovers of interrupted saves and create the temporary folder of checkpoint `step`.

    Args:
        folder: where to stage (see shared_staging_folder); default a fresh random `.tmp-` folder.
    """
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # leftovers of an interrupted save
        shutil.rmtree(stale, ignore_errors=True)
    if folder is None:
        return Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:08d}-", dir=root))
    folder.mkdir(parents=True)
    return folder


def publish_checkpoint(run_dir: Path, step: int, tmp: Path, state: dict[str, Any],
                       keep: int) -> Path:
    """Write the trainer state and the COMPLETE marker into `tmp`, rename it into place, and keep
    only the newest `keep` complete checkpoints. Everything else must already be in `tmp`."""
    final = checkpoint_root(run_dir) / f"step-{step:08d}"
    torch.save(state, tmp / STATE_FILE)
    marker = tmp / COMPLETE
    with marker.open("w") as handle:
        json.dump({"step": step}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    if final.exists():  # re-saving the same step after a resume: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (folders without the COMPLETE marker are ignored)."""
    root = checkpoint_root(run_dir)
    if not root.exists():
        return []
    done = [p for p in root.glob("step-*") if (p / COMPLETE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    done = list_checkpoints(run_dir)
    return done[-1] if done else None


def load_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state saved with a checkpoint."""
    return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)
