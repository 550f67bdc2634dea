"""PPO on the bundled SmolLM2-135M-Instruct: the four roles placed apart vs colocated, side by side.

Runs the same short PPO (LoRA actor and critic, rule reward on the seeded arithmetic task, same
seed) once per placement on one local Ray and reports, per placement: Ray actors, the resident
memory of their processes (summed), and the mean time per iteration of each phase (generate,
score = reference + critic + reward, update = critic and actor), plus the mean score and KL.

    python benchmarks/ppo_smollm2.py --steps 3 --prompts 4 --samples 2 --max-new-tokens 24
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

PLACEMENTS = {"apart": [], "colocated": ["actor,ref", "critic,reward"]}


def run(placement: str, args: argparse.Namespace, workdir: Path, prompts: Path) -> dict[str, Any]:
    import psutil
    import ray

    from training.ppo import run_ppo

    rss: list[float] = []
    actors: list[int] = []

    def on_phase(step: int, phase: str, roles: Any) -> None:
        if phase == "done":
            pids = [ray.get(h.ping.remote())["pid"] for h in roles.handles]
            actors.append(len(pids))
            rss.append(sum(psutil.Process(p).memory_info().rss for p in pids) / 2**20)

    started = time.perf_counter()
    result = run_ppo(
        prompts=str(prompts), model="smollm2-135m-instruct", reward_model=None,
        out=str(workdir / placement), colocate=PLACEMENTS[placement],
        overrides=["reward=rule:format+accuracy", f"steps={args.steps}",
                   f"rollout_batch_size={args.prompts}", f"samples_per_prompt={args.samples}",
                   f"mini_batch_size={args.prompts * args.samples}",
                   f"max_new_tokens={args.max_new_tokens}", "lora=on", "save_steps=0",
                   "log_rollouts=false", "progress=false", "cpus_per_worker=0.5"],
        on_phase=on_phase)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
    later = records[1:] or records  # the first iteration includes one-off warm-up

    def mean(key: str) -> float:
        return statistics.mean(r[key] for r in later)

    return {"placement": placement, "ray_actors": actors[-1], "rss_mb": max(rss),
            "generate_s": mean("time/generate_s"), "score_s": mean("time/score_s"),
            "update_s": mean("time/update_s"), "iteration_s": mean("ppo/step_time_s"),
            "wall_s": wall, "score": mean("ppo/score"), "kl": mean("ppo/kl")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per iteration")
    parser.add_argument("--samples", type=int, default=2, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()

    from training.raycluster import ensure_ray, shutdown_ray
    from training.tasks import make_arithmetic_prompts

    ensure_ray()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            prompts = workdir / "prompts.jsonl"
            rows = make_arithmetic_prompts(args.prompts * args.steps, seed=0, split="train")
            prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
            results = [run(name, args, workdir, prompts) for name in PLACEMENTS]
    finally:
        shutdown_ray()
    columns = ["placement", "ray_actors", "rss_mb", "generate_s", "score_s", "update_s",
               "iteration_s", "wall_s", "score", "kl"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in results:
        print("| " + " | ".join(f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c])
                                for c in columns) + " |")
    apart, together = results
    print(f"\ncolocated / apart: memory {together['rss_mb'] / apart['rss_mb']:.2f}x, "
          f"iteration time {together['iteration_s'] / apart['iteration_s']:.2f}x")


if __name__ == "__main__":
    main()
