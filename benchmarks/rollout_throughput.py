"""Rollout throughput: the HF engine batched vs generating one prompt at a time, same run.

    python benchmarks/rollout_throughput.py                       # bundled SmolLM2, 32 prompts
    python benchmarks/rollout_throughput.py --prompts 16 --max-new-tokens 32 --batch-size 16

Both passes use the same engine (same weights, dtype and threads), the same prompts (the seeded
arithmetic task of training/tasks.py) and greedy decoding with the same token budget; EOS ends a
sequence early in both. Printed: completion tokens per second of each and their ratio (the
issue's bar is >= 5x). The one-at-a-time pass is the engine with batch_size=1, i.e. one prompt
per prefill + decode loop, the way a naive `model.generate` loop would run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    import torch

    from training.rollout import HFRolloutEngine, SamplingParams
    from training.tasks import make_arithmetic_prompts

    prompts = [row["prompt"] for row in make_arithmetic_prompts(args.prompts, 0, "test")]
    engine = HFRolloutEngine(args.model, dtype=args.dtype, batch_size=args.batch_size)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    engine.generate(prompts[:2], SamplingParams(max_new_tokens=4, temperature=0.0))  # warm-up

    def run(batch_size: int) -> tuple[float, int, list[list[int]]]:
        engine.batch_size = batch_size
        started = time.perf_counter()
        outputs = engine.generate(prompts, params)
        elapsed = time.perf_counter() - started
        ids = [samples[0].completion_ids for samples in outputs]
        return elapsed, sum(len(i) for i in ids), ids

    batched_s, batched_tokens, batched_ids = run(args.batch_size)
    single_s, single_tokens, single_ids = run(1)
    same = sum(a == b for a, b in zip(batched_ids, single_ids, strict=True))
    batched_rate, single_rate = batched_tokens / batched_s, single_tokens / single_s
    print(f"model={args.model} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"prompts={args.prompts} max_new_tokens={args.max_new_tokens}")
    print(f"batched (batch {args.batch_size}): {batched_tokens} tokens in {batched_s:.1f} s = "
          f"{batched_rate:.1f} tok/s")
    print(f"one at a time:        {single_tokens} tokens in {single_s:.1f} s = "
          f"{single_rate:.1f} tok/s")
    print(f"ratio: {batched_rate / single_rate:.2f}x   identical greedy outputs: "
          f"{same}/{len(prompts)}")


if __name__ == "__main__":
    main()
