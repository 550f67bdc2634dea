"""Import -> export round trips for the three kinds of feedback, with exact rows, on both DBs."""

import json
from itertools import combinations
from pathlib import Path

import pytest
from sqlmodel import func, select

from store.errors import InvalidInput
from store.exporting import ExportFilters, export_jsonl, majority, manifest_path_for
from store.importing import ImportRejected, import_jsonl
from store.models import Annotator, AnnotatorKind, Completion, Label, Prompt, Task
from store.values import sha256_hex


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def counts(db) -> dict[str, int]:
    with db.read() as s:
        return {m.__name__: s.exec(select(func.count()).select_from(m)).one()
                for m in (Prompt, Completion, Task, Label)}


CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name a prime above 10."}]
PAIRWISE = [
    {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"},
    {"prompt": CONVERSATION, "chosen": [{"role": "assistant", "content": "11"}],
     "rejected": [{"role": "assistant", "content": "12"}]},
]


def test_pairwise_round_trip_gives_back_the_same_pairs(db, tmp_path):
    report = import_jsonl(db, write_jsonl(tmp_path / "in.jsonl", PAIRWISE), format="pairwise",
                          source="hh")
    assert (report.rows_read, report.rows_written, report.errors) == (2, 2, [])
    result = export_jsonl(db, format="trl-preference", out=tmp_path / "out.jsonl")
    assert read_jsonl(result.path) == [
        # One shape per file (TRL's trainers need it): the text row is exported as chat.
        {"prompt": [{"role": "user", "content": "What is 2 + 2?"}],
         "chosen": [{"role": "assistant", "content": "4"}],
         "rejected": [{"role": "assistant", "content": "5"}], "weight": 1.0,
         "agreement": 1.0, "n_labels": 1, "task_id": 1, "task_kind": "pairwise"},
        {"prompt": CONVERSATION, "chosen": [{"role": "assistant", "content": "11"}],
         "rejected": [{"role": "assistant", "content": "12"}], "weight": 1.0, "agreement": 1.0,
         "n_labels": 1, "task_id": 2, "task_kind": "pairwise"},
    ]


def test_listwise_ranking_expands_to_all_ordered_pairs_weighted_one_over_c_k_2(db, tmp_path):
    rows = [{"prompt": "p", "completions": ["w", "x", "y", "z"], "ranking": [2, 0, 3, 1]}]
    import_jsonl(db, write_jsonl(tmp_path / "in.jsonl", rows), format="listwise")
    out = read_jsonl(export_jsonl(db, format="trl-preference", out=tmp_path / "o.jsonl").path)
    order = ["y", "w", "z", "x"]  # best to worst
    expected = {(order[i], order[j]) for i, j in combinations(range(4), 2)}
    assert {(r["chosen"], r["rejected"]) for r in out} == expected
    assert len(out) == 6
    assert all(r["weight"] == pytest.approx(1 / 6) for r in out)
    assert sum(r["weight"] for r in out) == pytest.approx(1.0)


def test_listwise_ties_give_no_pair_and_ratings_become_a_ranking(db, tmp_path):
    rows = [{"prompt": "p", "completions": ["a", "b", "c"], "ratings": [3, 3, 1]},
            {"prompt": "q", "completions": ["d", "e", "f"], "ranking": [[0, 1], 2]}]
    import_jsonl(db, write_jsonl(tmp_path / "in.jsonl", rows), format="listwise")
    result = export_jsonl(db, format="trl-preference", out=tmp_path / "o.jsonl")
    assert [(r["chosen"], r["rejected"], r["weight"]) for r in read_jsonl(result.path)] == [
        ("a", "c", 1 / 3), ("b", "c", 1 / 3), ("d", "f", 1 / 3), ("e", "f", 1 / 3)]
    assert result.counts["skipped_tie"] == 2
    listwise = read_jsonl(export_jsonl(db, format="listwise", out=tmp_path / "l.jsonl").path)
    assert [(r["completions"], r["ranks"]) for r in listwise] == [
        (["a", "b", "c"], [1, 1, 2]), (["d", "e", "f"], [1, 1, 2])]


def test_binary_round_trip_and_sft_export(db, tmp_path):
    rows = [{"prompt": "capital of France?", "completion": "Paris", "label": True},
            {"prompt": "capital of France?", "completion": "Lyon", "label": "down"}]
    import_jsonl(db, write_jsonl(tmp_path / "in.jsonl", rows), format="binary")
    out = read_jsonl(export_jsonl(db, format="trl-unpaired", out=tmp_path / "u.jsonl").path)
    assert [(r["prompt"], r["completion"], r["label"], r["weight"]) for r in out] == [
        ("capital of France?", "Paris", True, 1.0), ("capital of France?", "Lyon", False, 1.0)]
    sft = read_jsonl(export_jsonl(db, format="sft", out=tmp_path / "s.jsonl").path)
    assert [(r["prompt"], r["completion"]) for r in sft] == [("capital of France?", "Paris")]


def test_pairs_as_unpaired_gives_one_desirable_and_one_undesirable_row(db, tmp_path):
    import_jsonl(db, write_jsonl(tmp_path / "in.jsonl", PAIRWISE[:1]), format="pairwise")
    filters = ExportFilters(pairs_as_unpaired=True)
    out = read_jsonl(export_jsonl(db, format="trl-unpaired", out=tmp_path / "u.jsonl",
                                  filters=filters).path)
    assert [(r["completion"], r["label"]) for r in out] == [("4", True), ("5", False)]


def test_several_annotators_are_aggregated_by_majority_with_agreement(db, tmp_path):
    rows = [
        {"prompt": "p", "chosen": "good", "rejected": "bad", "annotator": "alice"},
        {"prompt": "p", "chosen": "good", "rejected": "bad", "annotator": "bob"},
        # carol saw the pair the other way round: it is the same task, and she disagrees.
        {"prompt": "p", "chosen": "bad", "rejected": "good", "annotator": "carol"},
        {"prompt": "p", "chosen": "good", "rejected": "bad", "annotator": "judge",
         "annotator_kind": "ai"},
        {"prompt": "q", "chosen": "x", "rejected": "y", "annotator": "alice"},
        {"prompt": "q", "chosen": "y", "rejected": "x", "annotator": "bob"},
    ]
    import_jsonl(db, write_jsonl(tmp_path / "in.jsonl", rows), format="pairwise")
    assert counts(db)["Task"] == 2

    def export(**kw):
        result = export_jsonl(db, format="trl-preference", out=tmp_path / "o.jsonl",
                              filters=ExportFilters(**kw))
        return [(r["chosen"], r["agreement"], r["n_labels"]) for r in read_jsonl(result.path)], \
            result.counts

    rows_all, c = export()
    assert rows_all == [("good", 0.75, 4)]
    assert c["skipped_no_majority"] == 1  # q: one vote each way
    assert export(sources=("human",))[0] == [("good", pytest.approx(2 / 3), 3)]
    assert export(sources=("ai",))[0] == [("good", 1.0, 1)]
    assert export(sources=("rule",))[0] == []
    assert export(sources=("human",), min_agreement=0.7)[0] == []
    assert export(sources=("human",), min_agreement=0.7)[1]["skipped_low_agreement"] == 1


def test_listwise_aggregation_takes_the_majority_per_pair(db, tmp_path):
    rows = [{"prompt": "p", "completions": ["a", "b", "c"], "ranking": r, "annotator": n}
            for n, r in (("u1", [0, 1, 2]), ("u2", [0, 1, 2]), ("u3", [1, 0, 2]))]
    import_jsonl(db, write_jsonl(tmp_path / "in.jsonl", rows), format="listwise")
    out = read_jsonl(export_jsonl(db, format="trl-preference", out=tmp_path / "o.jsonl").path)
    assert [(r["chosen"], r["rejected"], r["agreement"]) for r in out] == [
        ("a", "b", pytest.approx(2 / 3)), ("a", "c", 1.0), ("b", "c", 1.0)]


def test_manifest_names_the_exact_bytes_and_re_export_is_identical(db, tmp_path):
    import_jsonl(db, write_jsonl(tmp_path / "in.jsonl", PAIRWISE), format="pairwise")
    first = export_jsonl(db, format="trl-preference", out=tmp_path / "a.jsonl",
                         filters=ExportFilters(sources=("human",)))
    second = export_jsonl(db, format="trl-preference", out=tmp_path / "b.jsonl",
                          filters=ExportFilters(sources=("human",)))
    manifest = json.loads(manifest_path_for(first.path).read_text())
    assert manifest["sha256"] == sha256_hex(first.path.read_bytes()) == second.sha256
    assert (manifest["format"], manifest["rows"], manifest["filters"]["sources"]) == (
        "trl-preference", 2, ["human"])
    assert (manifest["snapshot_id"], second.snapshot_id) == (1, 2)
    assert manifest["counts"]["tasks_pairwise"] == 2


def test_bad_rows_are_reported_with_line_numbers_and_fail_writes_nothing(db, tmp_path):
    rows = [
        PAIRWISE[0],                                                     # 1 good
        {"prompt": "p", "chosen": "x"},                                  # 2 missing rejected
        "{not json",                                                     # 3
        {"prompt": "p", "completions": ["a", "b"], "ranking": [0, 5]},   # 4 wrong format row
        {"prompt": 5, "chosen": "x", "rejected": "y"},                   # 5 wrong type
        {"prompt": "p", "chosen": "same", "rejected": "same"},           # 6 identical
        PAIRWISE[0],                                                     # 7 duplicate of 1
        {"prompt": "q", "chosen": "x", "rejected": "y"},                 # 8 good
    ]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(ImportRejected) as info:
        import_jsonl(db, path, format="pairwise")
    errors = {e.line: e.message for e in info.value.report.errors}
    assert sorted(errors) == [2, 3, 4, 5, 6, 7]
    assert "missing field 'rejected'" in errors[2]
    assert "not valid JSON" in errors[3]
    assert "missing field 'chosen'" in errors[4]
    assert "prompt must be" in errors[5]
    assert "identical" in errors[6]
    assert "duplicate" in errors[7]
    assert counts(db) == {"Prompt": 0, "Completion": 0, "Task": 0, "Label": 0}


def test_skip_writes_the_good_rows_and_lists_the_bad(db, tmp_path):
    rows = [PAIRWISE[0], {"prompt": "p", "chosen": "x"}, PAIRWISE[0], PAIRWISE[1]]
    report = import_jsonl(db, write_jsonl(tmp_path / "in.jsonl", rows), format="pairwise",
                          on_error="skip")
    assert (report.rows_written, [e.line for e in report.errors]) == (2, [2, 3])
    assert counts(db) == {"Prompt": 2, "Completion": 4, "Task": 2, "Label": 2}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "p", "completions": ["a", "b"], "ranking": [0, 2]}, "there are 2"),
        ({"prompt": "p", "completions": ["a", "b"], "ranking": [0]}, "missing"),
        ({"prompt": "p", "completions": ["a", "b"]}, "exactly one of"),
        ({"prompt": "p", "completions": ["a", "a"], "ranking": [0, 1]}, "twice"),
        ({"prompt": "p", "completions": ["a", "b"], "ratings": [1]}, "ratings"),
        ({"prompt": "p", "completions": "ab", "ranking": [0, 1]}, "must be a list"),
    ],
)
def test_bad_listwise_rows_name_the_problem(db, tmp_path, row, message):
    with pytest.raises(ImportRejected) as info:
        import_jsonl(db, write_jsonl(tmp_path / "in.jsonl", [row]), format="listwise")
    [error] = info.value.report.errors
    assert error.line == 1 and message in error.message
    assert counts(db)["Label"] == 0


def test_tasks_import_creates_unlabelled_work_once(db, tmp_path):
    rows = [{"prompt": "p", "completions": ["a", "b"], "kind": "pairwise"},
            {"prompt": "p", "completions": ["a", "b", "c"], "kind": "listwise", "overlap": 3},
            {"prompt": "p", "completions": ["a"], "kind": "binary",
             "gold": {"choice": "up"}}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    first = import_jsonl(db, path, format="tasks")
    second = import_jsonl(db, path, format="tasks")
    assert (first.created["tasks"], second.created.get("tasks", 0)) == (3, 0)
    with db.read() as s:
        tasks = s.exec(select(Task).order_by(Task.id)).all()
    assert [(t.kind.value, t.overlap, t.gold) for t in tasks] == [
        ("pairwise", 1, None), ("listwise", 3, None), ("binary", 1, {"choice": "up"})]
    assert counts(db) == {"Prompt": 1, "Completion": 3, "Task": 3, "Label": 0}


def test_imported_annotators_get_the_requested_kind(db, tmp_path):
    import_jsonl(db, write_jsonl(tmp_path / "in.jsonl", PAIRWISE[:1]), format="pairwise",
                 source="rm-judge", annotator_kind=AnnotatorKind.ai)
    out = export_jsonl(db, format="trl-preference", out=tmp_path / "o.jsonl",
                       filters=ExportFilters(sources=("human",)))
    assert out.rows == 0


def test_majority():
    assert majority(["a", "a", "b"]) == ("a", 2 / 3)
    assert majority(["a", "b"]) == (None, 0.5)
    assert majority([]) == (None, 0.0)


def test_bad_filters_and_formats_are_refused(db, tmp_path):
    with pytest.raises(InvalidInput):
        ExportFilters(sources=("robots",))
    with pytest.raises(InvalidInput):
        ExportFilters(min_agreement=2)
    with pytest.raises(InvalidInput):
        export_jsonl(db, format="csv", out=tmp_path / "x")  # type: ignore[arg-type]
    assert not (tmp_path / "x").exists()


def test_ai_labels_can_be_weighted_or_filtered_by_their_judges_calibrated_agreement(db, tmp_path):
    from store.calibration import record_calibration

    rows = [{"prompt": "p", "chosen": "x", "rejected": "y", "annotator": "alice"}] + [
        {"prompt": "p", "chosen": "y", "rejected": "x", "annotator": name, "annotator_kind": "ai"}
        for name in ("good-judge", "weak-judge", "new-judge")]
    import_jsonl(db, write_jsonl(tmp_path / "in.jsonl", rows), format="pairwise")
    with db.write() as s:
        ids = {a.name: a.id for a in s.exec(select(Annotator))}
        record_calibration(session=s, annotator_id=ids["good-judge"], n_tasks=50,
                           metrics={"agreement": 0.9})
        record_calibration(session=s, annotator_id=ids["weak-judge"], n_tasks=50,
                           metrics={"agreement": 0.3})

    def export(**kw):
        result = export_jsonl(db, format="trl-preference", out=tmp_path / "o.jsonl",
                              filters=ExportFilters(**kw))
        manifest = json.loads(result.manifest_path.read_text())
        rows = [(r["chosen"], round(r["agreement"], 6), r["n_labels"])
                for r in read_jsonl(result.path)]
        return rows, result.counts, manifest["judge_agreements"]

    # Plain majority: three judges outvote the human.
    assert export()[0] == [("y", 0.75, 4)]
    # Weighted: human 1.0 vs judges 0.9 + 0.3 (the uncalibrated judge weighs nothing).
    rows_w, counts_w, used = export(weight_ai_by_agreement=True)
    assert rows_w == [("y", round(1.2 / 2.2, 6), 3)]
    assert counts_w["labels_dropped_judge_agreement"] == 1
    assert used == {str(ids["good-judge"]): 0.9, str(ids["weak-judge"]): 0.3}
    # Filtered at 0.5: the weak and the uncalibrated judge go; 1 vs 1 has no majority.
    rows_f, counts_f, _ = export(min_judge_agreement=0.5)
    assert rows_f == [] and counts_f["skipped_no_majority"] == 1
    # Both: the human (1.0) outweighs the one judge left (0.9).
    assert export(min_judge_agreement=0.5, weight_ai_by_agreement=True)[0] == [
        ("x", round(1 / 1.9, 6), 2)]


def test_weighted_majority_and_ranks():
    assert majority(["a", "b", "b"], [3.0, 1.0, 1.0]) == ("a", 0.6)
    assert majority(["a", "b"], [0.5, 0.5]) == (None, 0.5)
    from store.exporting import aggregate_ranks

    assert aggregate_ranks([[1, 2, 3], [3, 2, 1]], [3.0, 1.0]) == [1, 2, 3]
    assert aggregate_ranks([[1, 2, 3], [3, 2, 1]]) == [1, 1, 1]
