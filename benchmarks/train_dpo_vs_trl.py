"""DPO training speed: prefloop vs TRL's DPOTrainer, same export, model and batch settings.

    python benchmarks/train_dpo_vs_trl.py                      # tiny model + bundled SmolLM2
    python benchmarks/train_dpo_vs_trl.py --models tiny --steps 20
    python benchmarks/train_dpo_vs_trl.py --models smollm2 --variant fused_optimizer=false

For each model, each framework trains sigmoid DPO for `--steps` optimizer steps in its own
subprocess (so peak memory is per framework), with full fine-tuning, the same learning rate and
schedule, no gradient checkpointing and the same precision (bf16 autocast where the CPU/GPU
supports it). Printed side by side: samples/s (pairs per second, reference log-probs included:
prefloop precomputes them before the loop, TRL runs the reference every step), the ratio, peak
memory (max RSS on CPU, max allocated on CUDA), the first-step loss of each, and the MFU:
6 * parameters * tokens trained per second over the machine's measured bf16 matmul peak (the
reference forward is not counted as useful FLOPs). `--variant KEY=VALUE[,KEY=VALUE]` adds a
prefloop run with those config overrides (e.g. an optimisation switched off) to the same
alternation, so before/after and TRL are measured under the same machine load. Figures go to
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOPICS = ["photosynthesis", "the water cycle", "compound interest", "plate tectonics",
          "vaccines", "binary search", "supply and demand", "the French revolution",
          "black holes", "recycling", "machine translation", "the immune system",
          "inflation", "volcanoes", "democracy", "electric cars"]


def write_export(path: Path, pairs: int) -> Path:
    """Conversational pairs shaped like PLATFORM.md section 13: ~100-token prompts with the
    chat template's system prompt, ~20-token answers."""
    import hashlib

    rows = []
    for i in range(pairs):
        topic = TOPICS[i % len(TOPICS)]
        context = (f"I am preparing a short lesson for a class of twelve-year-olds about {topic}. "
                   "They have already seen the basic vocabulary, but many of them still mix up "
                   "cause and effect, so I want an explanation that is concrete, correct and "
                   f"short. Example {i}: ")
        prompt = [{"role": "user", "content": context + f"Explain {topic} in one sentence."}]
        chosen = f"In short, {topic} is a process you can describe step by step with causes."
        rejected = f"{topic.capitalize()} is something complicated that nobody fully understands."
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}], "weight": 1.0})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    Path(str(path) + ".manifest.json").write_text(json.dumps({"sha256": digest}))
    return path


def matmul_peak_gflops(dtype_name: str, size: int = 2048, reps: int = 10) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def count_tokens(data: Path, model_path: str, max_length: int) -> tuple[int, int]:
    """(training tokens over the whole export, number of pairs): prompt counted for both sides."""
    from training.data import PairExample, build_examples, read_export
    from training.models import load_tokenizer

    tok = load_tokenizer(model_path)
    examples, _ = build_examples("dpo", "sigmoid", read_export(data), tok, max_length=max_length,
                                 overlong="truncate")
    pairs = [e for e in examples if isinstance(e, PairExample)]
    tokens = sum(2 * len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in pairs)
    return tokens, len(examples)


# ----------------------------------------------------------------------------- workers


def run_prefloop(args: argparse.Namespace) -> dict:
    from training.trainer import train_from_cli

    out = Path(tempfile.mkdtemp(prefix="bench-prefloop-"))
    result = train_from_cli(
        "dpo", data=args.data, model=args.model, out=str(out / "run"),
        overrides=[f"batch_size={args.batch_size}", f"max_steps={args.steps}",
                   f"max_length={args.max_length}", "lora=off", f"precision={args.precision}",
                   f"learning_rate={args.lr}", "lr_schedule=linear", "save_steps=0",
                   "progress=false", "beta=0.1", "max_grad_norm=1.0",
                   *[item for item in (args.set or "").split(",") if item]],
    )
    info = json.loads((result.run_dir / "run.json").read_text())
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    seconds = info["reference_logps_s"] + info["train_loop_s"]
    shutil.rmtree(out, ignore_errors=True)  # a SmolLM2 run leaves ~2.6 GB of checkpoints
    return {"seconds": seconds, "first_loss": rows[0]["train/loss"],
            "last_loss": rows[-1]["train/loss"], "peak_mb": peak_memory_mb()}


def run_trl(args: argparse.Namespace) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from training.data import read_export
    from training.models import load_tokenizer

    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")}
            for r in read_export(args.data).rows]
    times: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *_a, **_k):
            times["start"] = time.perf_counter()

        def on_train_end(self, *_a, **_k):
            times["end"] = time.perf_counter()

    output_dir = tempfile.mkdtemp(prefix="bench-trl-")
    config = DPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps, use_cpu=not args.cuda, report_to="none", save_strategy="no",
        max_length=args.max_length, bf16=args.precision == "bf16",
        gradient_checkpointing=False, learning_rate=args.lr, lr_scheduler_type="linear",
        warmup_steps=0, logging_steps=1, seed=0, beta=0.1, max_grad_norm=1.0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    # The model as a path: TRL loads the policy and builds its own reference from it.
    trainer = DPOTrainer(model=args.model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=load_tokenizer(args.model), callbacks=[Clock()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    shutil.rmtree(output_dir, ignore_errors=True)
    return {"seconds": times["end"] - times["start"], "first_loss": losses[0],
            "last_loss": losses[-1], "peak_mb": peak_memory_mb()}


# ----------------------------------------------------------------------------- driver


def resolve(model: str, workdir: Path) -> tuple[str, str]:
    """(label, local path) for a benchmark model name."""
    from training.models import (
        convert_bundled_tokenizer,
        load_tokenizer,
        resolve_model,
        save_tiny_model,
    )

    if model == "tiny":
        path = workdir / "tiny-llama"
        if not (path / "config.json").exists():
            tok = load_tokenizer(str(convert_bundled_tokenizer("smollm2-135m-instruct")))
            save_tiny_model(path, tok, seed=0)
        return "tiny (2 layers, hidden 64)", str(path)
    return "SmolLM2-135M-Instruct", resolve_model("smollm2-135m-instruct")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--precision", choices=["bf16", "fp32", "auto"], default="auto")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--worker", choices=["prefloop", "trl"])
    parser.add_argument("--set", help="(worker) extra prefloop overrides, comma-separated")
    parser.add_argument("--variant", action="append", default=[],
                        help="also run prefloop with these overrides (KEY=VALUE[,KEY=VALUE])")
    parser.add_argument("--model")
    parser.add_argument("--data")
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--repeats", type=int, default=1,
                        help="alternate prefloop/TRL runs this many times; report each one's best "
                             "(the machine may be shared: alternation spreads the noise evenly)")
    args = parser.parse_args()

    if args.worker:
        result = run_prefloop(args) if args.worker == "prefloop" else run_trl(args)
        print("RESULT " + json.dumps(result))
        return

    import torch

    from training.runtime import bf16_supported, select_device

    device = select_device("auto")
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if bf16_supported(device) else "fp32"
    workdir = Path(os.environ.get("PREFLOOP_BENCH_DIR", tempfile.mkdtemp(prefix="bench-dpo-")))
    workdir.mkdir(parents=True, exist_ok=True)
    data = write_export(workdir / "pairs.jsonl", args.steps * args.batch_size)
    peak = {"bf16": matmul_peak_gflops("bfloat16"), "fp32": matmul_peak_gflops("float32")}
    print(f"device={device.type} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"precision={precision} steps={args.steps} batch={args.batch_size} "
          f"max_length={args.max_length} pairs={args.steps * args.batch_size}")
    print(f"measured matmul peak (2048x2048): bf16 {peak['bf16']:.0f} GFLOP/s, "
          f"fp32 {peak['fp32']:.0f} GFLOP/s")
    header = (f"{'model':28} {'framework':32} {'samples/s':>9} {'seconds':>8} {'peak MB':>8} "
              f"{'first loss':>11} {'last loss':>10} {'MFU':>6}")
    for name in args.models.split(","):
        label, path = resolve(name, workdir)
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(path)
        params = _count_params(path)
        tokens, pairs = count_tokens(data, path, args.max_length)
        results: dict[str, dict] = {}
        frameworks = ["prefloop", *[f"prefloop[{v}]" for v in args.variant], "trl"]
        for framework in frameworks * args.repeats:
            worker, _, overrides = framework.partition("[")
            cmd = [sys.executable, __file__, "--worker", worker, "--model", path, "--data",
                   str(data), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                   "--max-length", str(args.max_length), "--precision", precision,
                   "--lr", str(args.lr), "--set", overrides.rstrip("]")]
            cmd += ["--cuda"] if device.type == "cuda" else []
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"{framework} worker failed on {label}")
            result = json.loads(lines[-1][len("RESULT "):])
            if framework not in results or result["seconds"] < results[framework]["seconds"]:
                results[framework] = result
        print(f"\n{label} (best of {args.repeats}): {params / 1e6:.1f}M parameters, "
              f"{cfg.num_hidden_layers} layers; {tokens / pairs:.0f} training tokens per pair; "
              f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        print(header)
        for framework, r in results.items():
            samples_s = pairs / r["seconds"]
            mfu = 6 * params * tokens / r["seconds"] / (peak[precision] * 1e9)
            r["samples_s"] = samples_s
            print(f"{label[:28]:28} {framework:32} {samples_s:9.2f} {r['seconds']:8.1f} "
                  f"{r['peak_mb']:8.0f} {r['first_loss']:11.6f} {r['last_loss']:10.4f} "
                  f"{100 * mfu:5.1f}%")
        for framework in frameworks[:-1]:
            ratio = results[framework]["samples_s"] / results["trl"]["samples_s"]
            mem = results[framework]["peak_mb"] / results["trl"]["peak_mb"]
            diff = abs(results[framework]["first_loss"] - results["trl"]["first_loss"])
            print(f"{framework} / TRL: {ratio:.2f}x samples/s, {mem:.2f}x peak memory, "
                  f"first-step loss difference {diff:.1e}")


def _count_params(path: str) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    main()
