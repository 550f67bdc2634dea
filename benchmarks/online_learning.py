"""Learning, not only running: GRPO and iterative online DPO on the bundled SmolLM2.

    python benchmarks/online_learning.py                      # both algorithms
    python benchmarks/online_learning.py --algo grpo --iterations 6

The task is training/tasks.py's seeded arithmetic ("What is 17 + 5?", one example turn in the
prompt, the answer inside <answer></answer>), scored by the rule reward format+accuracy (0, 0.5 or
1 per answer). Held-out reward = the mean over the test split's prompts (disjoint from the
training ones), sampled at temperature 1 with a fixed seed, before training and after it, so the
figure is the policy being trained as it samples. Everything runs as `run_online` runs it: a
Ray actor generates, this process learns (LoRA, fp32 or bf16 autocast as the CPU allows), weights
are synced after every update. Printed per algorithm: held-out reward before -> after, the
format and accuracy rates behind it, optimizer steps and wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rates(eval_file: Path, iteration: int) -> tuple[float, float]:
    from training.rewards import rule_reward

    rows = [json.loads(line) for line in eval_file.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["iteration"] == iteration]
    texts, answers = [r["text"] for r in rows], [r["answer"] for r in rows]
    fmt = rule_reward("format")(texts, texts, answers)
    acc = rule_reward("accuracy")(texts, texts, answers)
    return sum(fmt) / len(fmt), sum(acc) / len(acc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algo", default="both", choices=["grpo", "online-dpo", "both"])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--train-prompts", type=int, default=96)
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=0, help="0: the algorithm's default")
    parser.add_argument("--out", default="")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides")
    args = parser.parse_args()

    from training.online import run_online
    from training.tasks import make_arithmetic_prompts

    out = Path(args.out or tempfile.mkdtemp(prefix="prefloop-online-learning-"))
    out.mkdir(parents=True, exist_ok=True)
    train, test = out / "train.jsonl", out / "test.jsonl"
    for path, split, n in ((train, "train", args.train_prompts), (test, "test",
                                                                   args.eval_prompts)):
        rows = make_arithmetic_prompts(n, seed=0, split=split)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    algos = ["grpo", "online-dpo"] if args.algo == "both" else [args.algo]
    for algo in algos:
        overrides = [f"eval_prompts={test}", "eval_temperature=1.0", "eval_samples=2",
                     *(f"iterations={args.iterations}" for _ in [0] if args.iterations),
                     *args.set]
        started = time.perf_counter()
        result = run_online(algo, prompts=str(train), model=args.model,  # type: ignore[arg-type]
                            out=str(out / algo), overrides=overrides)
        wall = time.perf_counter() - started
        m = result.metrics
        eval_file = result.run_dir / "eval.jsonl"
        config = json.loads((result.run_dir / "config.json").read_text())
        before_f, before_a = _rates(eval_file, 0)
        after_f, after_a = _rates(eval_file, config["iterations"])
        print(f"{algo}: held-out reward {m['eval/reward_before']:.3f} -> "
              f"{m['eval/reward_after']:.3f} (format {before_f:.2f} -> {after_f:.2f}, accuracy "
              f"{before_a:.2f} -> {after_a:.2f}); {result.steps} optimizer steps, "
              f"{config['iterations']} iterations x {config['prompts_per_iteration']} prompts x "
              f"{config['samples_per_prompt']} samples; wall {wall:.0f} s; run {result.run_dir}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
