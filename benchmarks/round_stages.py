"""End-to-end round wall time split by stage, on the demo config (loop/configs/demo.toml).

Runs N rounds of `prefloop demo` on a fresh SQLite store (or reads rounds already in a store with
--from-db) and prints, per round and in total, the wall time of each stage (collect, generate,
label, build_dataset, train, evaluate, decide) with its share, plus the parts the stages report
themselves (sampling, training loop, eval generation, KL, judge calls).

    python benchmarks/round_stages.py --rounds 1
    python benchmarks/round_stages.py --from-db sqlite:///runs/demo.db
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from store.rounds import STAGES, RoundSummary


def parts(metrics: dict) -> dict[str, float]:
    """Sub-timings the stages record: sampling, training, eval generation/KL, judges."""
    out: dict[str, float] = {}
    out["generate/sampling"] = metrics.get("generate", {}).get("sample_s") or 0.0
    out["train/trainer (incl. model load, merge)"] = metrics.get("train", {}).get("train_s") or 0.0
    evaluate = metrics.get("evaluate", {})
    for key, value in (evaluate.get("timings") or {}).items():
        out[f"evaluate/{key}"] = value
    for stage in ("label", "evaluate"):
        for judge, stats in (metrics.get(stage, {}).get("judges") or {}).items():
            if isinstance(stats, dict) and "elapsed_s" in stats:
                out[f"{stage}/{judge}"] = stats["elapsed_s"]
    return out


def report(rounds: list[tuple[RoundSummary, dict]]) -> None:
    totals = dict.fromkeys(STAGES, 0.0)
    for summary, metrics in rounds:
        wall = summary.wall_s or 1.0
        print(f"round {summary.id} ({summary.state}): {summary.wall_s:.1f} s")
        for stage in STAGES:
            seconds = summary.timings.get(stage, 0.0)
            totals[stage] += seconds
            print(f"  {stage:<14} {seconds:8.1f} s  {100 * seconds / wall:5.1f} %")
        for name, seconds in parts(metrics).items():
            print(f"    {name:<48} {seconds:8.1f} s")
    grand = sum(totals.values()) or 1.0
    print(f"all {len(rounds)} round(s): {grand:.1f} s")
    for stage, seconds in totals.items():
        print(f"  {stage:<14} {seconds:8.1f} s  {100 * seconds / grand:5.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--from-db", help="Report the rounds of this store instead of running.")
    parser.add_argument("--no-ai-judge", action="store_true")
    args = parser.parse_args()

    from store import migrate
    from store.db import Database
    from store.rounds import list_rounds

    if args.from_db:
        db = Database.from_url(args.from_db)
    else:
        from loop.config import CONFIG_DIR, load_round_config
        from loop.demo import run_demo

        tmp = Path(tempfile.mkdtemp(prefix="round-stages-"))
        db = Database.from_url(f"sqlite:///{tmp / 'store.db'}")
        migrate.upgrade(db.engine)
        run_demo(db, load_round_config(CONFIG_DIR / "demo.toml"), rounds=args.rounds,
                 runs_dir=tmp / "runs", ai_judge=not args.no_ai_judge)
    with db.read() as session:
        rows = [(RoundSummary.of(r), r.metrics or {}) for r in list_rounds(session)]
    report(rows)


if __name__ == "__main__":
    main()
