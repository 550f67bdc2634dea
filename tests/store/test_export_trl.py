"""Exports have one shape per file and train with TRL's own DPOTrainer and KTOTrainer.

Importing examples/*.jsonl gives a store of text and chat-message rows; before shapes, its
export mixed the two and TRL crashed (`'list' object has no attribute 'endswith'`). The TRL
tests drive the real `prefloop` CLI (import, export) and then train one step of each trainer on
a tiny in-process model with SmolLM2's tokenizer (extracted from the bundled GGUF; no download).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import cli
from store.errors import InvalidInput
from store.export_shape import as_chat, shape_rows
from store.exporting import ExportFilters, export_jsonl
from store.importing import import_jsonl

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
HAIKU = "Soft rain on the roof\nwhispers to the sleeping town\npuddles hold the sky"
CAT = ["A cat spent the day on a mat.", "The cat sat.", "Dogs are great."]


# U and A spell out the expected messages by hand, independently of store.export_shape.
def U(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def A(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def import_examples(db: Any) -> None:
    for name in ("pairwise", "listwise", "binary"):
        report = import_jsonl(db, EXAMPLES / f"{name}.jsonl", format=name, source="demo")
        assert report.errors == []


def pair(task: int, kind: str, prompt: Any, chosen: Any, rejected: Any, weight: float,
         agreement: float = 1.0, n_labels: int = 1) -> dict[str, Any]:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "weight": weight,
            "agreement": agreement, "n_labels": n_labels, "task_id": task, "task_kind": kind}


def expected_pairs(shape: str) -> list[dict[str, Any]]:
    """The examples' preference pairs, in export order, as `shape` writes them."""
    u, a = (U, A) if shape == "chat" else (str, str)
    rows = [
        pair(1, "pairwise", u("What is 2 + 2?"), a("2 + 2 = 4."), a("2 + 2 = 5."), 1.0),
        pair(2, "pairwise", U("Name a prime number greater than 10."), A("11 is prime."),
             A("12 is prime."), 1.0),
        pair(3, "pairwise", u("Write a haiku about rain."), a(HAIKU), a("Rain is wet."), 1.0,
             2 / 3, 3),
    ]
    # Listwise: every ordered pair of the aggregated ranking, weight 1/C(K,2), ties dropped.
    rows += [pair(4, "listwise", u("Summarise: The cat sat on the mat all day."), a(CAT[i]),
                  a(CAT[j]), 1 / 3) for i, j in ((0, 1), (0, 2), (1, 2))]
    bonjour = u("Translate 'bonjour' to English.")
    rows += [pair(5, "listwise", bonjour, a(c), a(r), 1 / 6) for c, r in (
        ("Hello", "Goodbye"), ("Hello", "Bonjour"), ("Good day", "Goodbye"),
        ("Good day", "Bonjour"), ("Bonjour", "Goodbye"))]
    if shape == "text":
        rows = [row for row in rows if row["task_id"] != 2]
    return rows


# ------------------------------------------------------------------ the shape of a file


def test_auto_exports_a_mixed_store_as_chat_and_records_the_shape(db, tmp_path):
    import_examples(db)
    progress: list[tuple[str, int, int]] = []
    result = export_jsonl(db, format="trl-preference", out=tmp_path / "p.jsonl",
                          on_progress=lambda *event: progress.append(event))
    assert read_jsonl(result.path) == expected_pairs("chat")
    manifest = json.loads(result.manifest_path.read_text())
    assert (manifest["shape"], manifest["filters"]["shape"]) == ("chat", "auto")
    # Rows 1 and 3-11 were text; the conversational row 2 was left as it is.
    assert (manifest["counts"]["converted_to_chat"], manifest["rows"]) == (10, 11)
    # Five pairwise/listwise tasks read in one chunk, then the eleven rows rendered.
    assert progress == [("reading", 5, 5), ("writing", 11, 11)]


def test_text_shape_drops_conversational_rows_and_counts_them(db, tmp_path):
    import_examples(db)
    result = export_jsonl(db, format="trl-preference", out=tmp_path / "p.jsonl",
                          filters=ExportFilters(shape="text"))
    assert read_jsonl(result.path) == expected_pairs("text")
    assert (result.shape, result.counts["skipped_conversational"], result.rows) == ("text", 1, 10)


def test_chat_shape_converts_a_text_only_store_and_auto_leaves_it_text(db, tmp_path):
    for name in ("listwise", "binary"):
        import_jsonl(db, EXAMPLES / f"{name}.jsonl", format=name)
    auto = export_jsonl(db, format="sft", out=tmp_path / "a.jsonl")
    chat = export_jsonl(db, format="sft", out=tmp_path / "c.jsonl",
                        filters=ExportFilters(shape="chat"))
    assert auto.shape == "text" and "converted_to_chat" not in auto.counts
    assert read_jsonl(chat.path) == [as_chat(row) for row in read_jsonl(auto.path)]
    assert read_jsonl(chat.path)[0] == {
        "prompt": U("Summarise: The cat sat on the mat all day."), "completion": A(CAT[0]),
        "n_labels": 1, "task_id": 1, "task_kind": "listwise"}
    listwise = read_jsonl(export_jsonl(db, format="listwise", out=tmp_path / "l.jsonl",
                                       filters=ExportFilters(shape="chat")).path)
    assert listwise[0]["completions"] == [A(c) for c in CAT]


def test_shape_rows_keeps_a_conversational_row_and_refuses_an_unknown_shape():
    from collections import Counter

    chat_row = {"prompt": U("q"), "chosen": A("x"), "rejected": A("y")}
    counts: Counter[str] = Counter()
    assert shape_rows([chat_row], "auto", counts) == ([chat_row], "chat")
    assert shape_rows([], "auto", counts) == ([], "text")
    assert counts == Counter()
    with pytest.raises(InvalidInput, match="shape must be one of auto, text, chat"):
        ExportFilters(shape="parquet")  # type: ignore[arg-type]


def test_loading_in_chunks_gives_the_same_bytes_and_reports_each_chunk(db, tmp_path,
                                                                     monkeypatch):
    import store.exporting as exporting

    import_examples(db)
    whole = export_jsonl(db, format="trl-preference", out=tmp_path / "whole.jsonl")
    monkeypatch.setattr(exporting, "LOAD_CHUNK", 2)
    progress: list[tuple[str, int, int]] = []
    chunked = export_jsonl(db, format="trl-preference", out=tmp_path / "chunked.jsonl",
                           on_progress=lambda *event: progress.append(event))
    assert chunked.path.read_bytes() == whole.path.read_bytes()
    assert progress == [("reading", 2, 5), ("reading", 4, 5), ("reading", 5, 5),
                        ("writing", 11, 11)]


# ------------------------------------------------------------------ TRL's own trainers


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from training.models import convert_bundled_tokenizer, load_tokenizer

    return load_tokenizer(str(convert_bundled_tokenizer("smollm2-135m-instruct")))


@pytest.fixture(scope="module")
def tiny_model_dir(tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer Llama saved as a folder, so TRL loads the policy and its reference itself."""
    from training.models import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("tiny"), tokenizer, seed=0))


@pytest.fixture
def exported(tmp_path: Path) -> dict[str, Path]:
    """The examples imported and exported through the real CLI, as a newcomer would."""
    runner, url = CliRunner(), f"sqlite:///{tmp_path / 'store.db'}"

    def run(*args: str) -> str:
        result = runner.invoke(cli.app, ["--db", url, *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    for name in ("pairwise", "listwise", "binary"):
        run("import", str(EXAMPLES / f"{name}.jsonl"), "--format", name, "--source", "demo")
    files = {"preference": tmp_path / "prefs.jsonl", "unpaired": tmp_path / "kto.jsonl"}
    output = run("export", "--format", "trl-preference", "--out", str(files["preference"]))
    assert f"{files['preference']}: 11 rows (chat, 10 text rows as chat)" in output
    run("export", "--format", "trl-unpaired", "--pairs-as-unpaired", "--out",
        str(files["unpaired"]))
    return files


def _args(config_class: Any, tmp_path: Path, **extra: Any) -> Any:
    return config_class(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4,
                        max_steps=1, learning_rate=1e-2, use_cpu=True, report_to="none",
                        save_strategy="no", bf16=False, max_length=128, **extra)


def _train_one_step(trainer: Any) -> float:
    """One optimiser step; returns the step's loss after checking the weights moved."""
    import torch

    before = [p.detach().clone() for p in trainer.model.parameters()]
    output = trainer.train()
    assert trainer.state.global_step == 1
    moved = sum(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters(),
                                                       strict=True))
    assert moved > 0
    assert math.isfinite(output.training_loss)
    return float(output.training_loss)


def test_trl_dpotrainer_trains_a_step_on_the_export(exported, tokenizer, tiny_model_dir, tmp_path):
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer

    dataset = load_dataset("json", data_files=str(exported["preference"]), split="train")
    trainer = DPOTrainer(model=tiny_model_dir,
                         args=_args(DPOConfig, tmp_path, beta=0.1),
                         train_dataset=dataset, processing_class=tokenizer)
    # Row 1 was a text row: TRL rendered it through the chat template.
    assert trainer.train_dataset is not None
    prompt = tokenizer.decode(trainer.train_dataset[0]["prompt_ids"])
    assert prompt.endswith("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")
    _train_one_step(trainer)


def test_trl_dpotrainer_crashes_on_the_mixed_file_exports_used_to_write(tokenizer, tiny_model_dir,
                                                                      tmp_path):
    """The defect, reproduced: the same rows with the text ones left as text."""
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(row) + "\n" for row in expected_pairs("text")[:1]
                             + expected_pairs("chat")[1:]))
    dataset = load_dataset("json", data_files=str(mixed), split="train")
    with pytest.raises(AttributeError, match="'list' object has no attribute 'endswith'"):
        DPOTrainer(model=tiny_model_dir,
                   args=_args(DPOConfig, tmp_path, beta=0.1), train_dataset=dataset,
                   processing_class=tokenizer)


def test_trl_ktotrainer_trains_a_step_on_the_export(exported, tokenizer, tiny_model_dir, tmp_path):
    from datasets import load_dataset
    from trl import KTOConfig, KTOTrainer

    rows = read_jsonl(exported["unpaired"])
    # Two binary labels plus each of the 11 pairs as a desirable and an undesirable row.
    assert (len(rows), sum(row["label"] for row in rows)) == (24, 12)
    assert all(isinstance(row["prompt"], list) for row in rows)
    dataset = load_dataset("json", data_files=str(exported["unpaired"]), split="train")
    trainer = KTOTrainer(model=tiny_model_dir,
                         args=_args(KTOConfig, tmp_path, beta=0.1),
                         train_dataset=dataset, processing_class=tokenizer)
    _train_one_step(trainer)
