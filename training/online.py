"""Online RL without a critic: GRPO, rejection sampling (best-of-n + SFT), iterative online DPO.

Each iteration reads like a recipe: take the next prompts -> the rollout engine (a Ray actor)
samples several completions per prompt -> the reward source scores them -> the learner (this
process) updates the policy -> the new weights are pushed to the rollout actor.

- GRPO (training.grpo; Shao et al. 2024, DeepSeekMath, Sec. 4.1): G samples per prompt,
  group-normalised advantages, PPO's clipped ratio, a k3 KL term to the reference, no critic;
  default reward = rule format + accuracy.
- Rejection sampling (training.rejection_sampling; best-of-n as in Llama 2): n samples per
  prompt, the best one kept if good enough, supervised fine-tuning on the kept ones.
- Iterative online DPO (training.online_dpo; Xiong et al. 2024): K samples per prompt, pairs
  best-vs-worst (or all ordered pairs), DPO against the initial or the iteration's policy.

This module is the loop around them; the learner (policy, optimizer, reference) is
training.learner and the prompts file training.online_data.

    python -c "from training.online import run_online; run_online('grpo', \
prompts='prompts.jsonl', model='smollm2-135m-instruct', out='runs/grpo1')"

The run folder holds config.json (frozen), run.json, metrics.jsonl (one line per iteration),
samples.jsonl (every scored sample), eval.jsonl (held-out generations) and model/ (a FULL
Hugging Face folder; LoRA adapters are merged, see training.models.merge_adapter).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from training.config_reader import ConfigError
from training.grpo import grpo_update
from training.learner import Learner
from training.online_config import Algo, OnlineConfig, load_online_config
from training.online_data import (
    Group,
    IterationCallback,
    OnlineResult,
    PromptRow,
    prompt_order,
    read_prompts,
)
from training.online_dpo import dpo_update
from training.rejection_sampling import rs_update
from training.rewards import RewardFn, make_reward
from training.rollout import RolloutEngine, SamplingParams
from training.run_files import append_jsonl


def _rollout_dtype(config: OnlineConfig, learner: Learner) -> str:
    if config.rollout_dtype != "auto":
        return config.rollout_dtype
    from training.runtime import bf16_supported

    return "bfloat16" if bf16_supported(learner.device) else "float32"


def _start_engine(config: OnlineConfig, dtype: str, ray_address: str | None,
                  joined_ray: bool = False) -> tuple[RolloutEngine, Callable[[], None]]:
    """The rollout engine (a Ray actor unless rollout_actor is false) and how to stop it
    (`joined_ray`: this run already joined the cluster, so it leaves it at the end)."""
    engine_kwargs: dict[str, Any] = {"dtype": dtype}
    if config.rollout_engine == "hf":
        engine_kwargs["batch_size"] = config.rollout_batch_size
    if not config.rollout_actor:
        from training.rollout_ray import make_engine

        return make_engine(config.rollout_engine, config.model, **engine_kwargs), lambda: None
    import ray

    from training.raycluster import ensure_ray, shutdown_ray
    from training.rollout_ray import RayRolloutEngine

    started_ray = joined_ray or not ray.is_initialized()
    ensure_ray(ray_address)
    threads = config.rollout_threads or os.cpu_count() or 1
    engine = RayRolloutEngine(config.rollout_engine, config.model, num_cpus=1,
                              num_threads=threads, **engine_kwargs)

    def stop() -> None:
        engine.shutdown()
        if started_ray:
            shutdown_ray()

    return engine, stop


def evaluate(engine: RolloutEngine, rows: list[PromptRow], reward_fn: RewardFn,
             config: OnlineConfig) -> tuple[float, list[dict[str, Any]]]:
    """Mean reward on held-out prompts (greedy, or sampled with a fixed seed), and the scored
    generations."""
    sampled = config.eval_temperature > 0
    params = SamplingParams(max_new_tokens=config.max_new_tokens,
                            temperature=config.eval_temperature,
                            n=config.eval_samples if sampled else 1, stop=config.stop,
                            include_stop=config.include_stop, seed=config.seed + 7_919)
    outputs = engine.generate([r.prompt for r in rows], params)
    flat = [(r, sample) for r, samples in zip(rows, outputs, strict=True) for sample in samples]
    texts = [sample.text for _, sample in flat]
    rewards = reward_fn([r.prompt for r, _ in flat], texts, [r.answer for r, _ in flat])
    records = [{"id": r.id, "sample_index": sample.sample_index, "text": t, "reward": w,
                "answer": r.answer}
               for (r, sample), t, w in zip(flat, texts, rewards, strict=True)]
    return sum(rewards) / len(rewards), records


def train_online(config: OnlineConfig, *, ray_address: str | None = None,
                 reward_fn: RewardFn | None = None,
                 on_iteration: IterationCallback | None = None) -> OnlineResult:
    """Run `config.algo` for `config.iterations` iterations; see the module docstring.

    Args:
        config: a validated OnlineConfig.
        ray_address: a Ray cluster to join (None: a local Ray in this process).
        reward_fn: overrides config.reward (tests, custom Python rewards).
        on_iteration: callback(iteration, metrics) after each iteration.

    Raises:
        OnlineDataError, ConfigError, RewardSpecError: bad input, before any model is loaded.
        RayConnectError: the cluster at ray_address cannot be joined (before anything is
            written).
    """
    import torch
    from tqdm.auto import tqdm

    # 1. Everything that can be wrong with the input is checked before a model is loaded.
    rows = read_prompts(config.prompts)
    eval_rows = read_prompts(config.eval_prompts) if config.eval_prompts else []
    reward = reward_fn or make_reward(config.reward)
    run_dir = Path(config.out)
    if (run_dir / "config.json").exists() or (run_dir / "model").exists():
        raise ConfigError(f"{run_dir} already holds a run; choose another out folder")
    from training.models import resolve_model

    resolve_model(config.model)  # a missing model folder is refused before the run folder exists
    joined_ray = False
    if ray_address and config.rollout_actor:  # joined (or refused) before anything is written
        import ray

        from training.raycluster import ensure_ray

        joined_ray = not ray.is_initialized()
        ensure_ray(ray_address)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir / "config.json")
    for name in ("metrics.jsonl", "samples.jsonl", "eval.jsonl"):
        (run_dir / name).write_text("")

    needs_reference = (config.algo == "grpo" and config.kl_coef > 0) or (
        config.algo == "online-dpo" and config.reference == "initial")
    learner = Learner(config, needs_reference, prompts=[row.prompt for row in rows])
    dtype = _rollout_dtype(config, learner)
    sync_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(dtype)
    engine, stop_engine = _start_engine(config, dtype, ray_address, joined_ray)
    update = {"grpo": grpo_update, "rs": rs_update, "online-dpo": dpo_update}[config.algo]
    run_info: dict[str, Any] = {
        "algo": config.algo, "prompts": config.prompts, "num_prompts": len(rows),
        "torch": torch.__version__, "python": platform.python_version(),
        "device": learner.device.type, "bf16": learner.bf16, "lora": learner.lora,
        "attention": learner.attention,
        "rollout_dtype": dtype, "rollout_actor": config.rollout_actor,
    }
    (run_dir / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
    summary: dict[str, float] = {}
    last: dict[str, float] = {}
    started = time.perf_counter()
    try:
        if eval_rows:
            summary["eval/reward_before"], records = evaluate(engine, eval_rows, reward, config)
            append_jsonl(run_dir / "eval.jsonl", [{"iteration": 0, **r} for r in records])
        order = prompt_order(len(rows), config.seed)
        bar = tqdm(range(1, config.iterations + 1), desc=config.algo, unit="iter",
                   disable=not config.progress)
        for iteration in bar:
            # 2. Rollouts from the current policy.
            t0 = time.perf_counter()
            picked = [next(order) for _ in range(config.prompts_per_iteration)]
            params = SamplingParams(
                max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                top_p=config.top_p, n=config.samples_per_prompt, stop=config.stop,
                include_stop=config.include_stop, seed=config.seed * 1_000_003 + iteration)
            outputs = engine.generate([rows[i].prompt for i in picked], params)
            t1 = time.perf_counter()
            # 3. Rewards.
            flat = [(k, r) for k, samples in enumerate(outputs) for r in samples]
            scores = reward([rows[picked[k]].prompt for k, _ in flat], [r.text for _, r in flat],
                            [rows[picked[k]].answer for k, _ in flat])
            groups = [Group(rows[i], i, outputs[k], []) for k, i in enumerate(picked)]
            for (k, _), score in zip(flat, scores, strict=True):
                groups[k].rewards.append(float(score))
            sample_log = {
                (k, r.sample_index): {
                    "iteration": iteration, "prompt_index": picked[k], "id": rows[picked[k]].id,
                    "sample_index": r.sample_index, "text": r.text,
                    "answer": rows[picked[k]].answer,
                    "reward": float(score), "completion_ids": r.completion_ids,
                    "completion_tokens": len(r.completion_ids),
                    "finish_reason": r.finish_reason, "rollout_logp": float(sum(r.logprobs))}
                for (k, r), score in zip(flat, scores, strict=True)}
            t2 = time.perf_counter()
            # 4. Learn, then 5. push the new weights to the rollout engine.
            stats = update(learner, groups, config, sample_log)
            t3 = time.perf_counter()
            if stats.get("train/steps", 0.0) > 0:
                engine.load_state_dict(learner.weights_for_sync(sync_dtype))
            t4 = time.perf_counter()
            append_jsonl(run_dir / "samples.jsonl", list(sample_log.values()))
            reward_values = torch.tensor(scores, dtype=torch.float64)
            metrics: dict[str, float] = {
                "iteration": float(iteration), "step": float(learner.steps),
                "rollout/reward_mean": float(reward_values.mean()),
                "rollout/reward_std": float(reward_values.std()) if len(scores) > 1 else 0.0,
                "rollout/completion_tokens": sum(len(r.completion_ids) for _, r in flat)
                / len(flat),
                "rollout/stopped_rate": sum(r.finish_reason == "stop" for _, r in flat)
                / len(flat),
                **stats,
                "time/rollout_s": t1 - t0, "time/reward_s": t2 - t1, "time/learn_s": t3 - t2,
                "time/sync_s": t4 - t3,
                "rollout/tokens_per_s": sum(len(r.completion_ids) for _, r in flat)
                / max(t1 - t0, 1e-9),
            }
            if eval_rows and config.eval_every and iteration % config.eval_every == 0 \
                    and iteration != config.iterations:
                metrics["eval/reward"], records = evaluate(engine, eval_rows, reward, config)
                append_jsonl(run_dir / "eval.jsonl",
                              [{"iteration": iteration, **r} for r in records])
            append_jsonl(run_dir / "metrics.jsonl", [metrics])
            last = metrics
            bar.set_postfix(reward=f"{metrics['rollout/reward_mean']:.3f}",
                            steps=learner.steps, learn_s=f"{t3 - t2:.0f}")
            if on_iteration is not None:
                on_iteration(iteration, metrics)
        bar.close()
        if eval_rows:
            summary["eval/reward_after"], records = evaluate(engine, eval_rows, reward, config)
            append_jsonl(run_dir / "eval.jsonl",
                          [{"iteration": config.iterations, **r} for r in records])
    finally:
        stop_engine()
    model_dir = learner.save_full_model(run_dir)
    summary.update(last)
    summary["time/total_s"] = time.perf_counter() - started
    run_info.update({"steps_done": learner.steps, "final_metrics": summary})
    (run_dir / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
    return OnlineResult(run_dir, model_dir, learner.steps, summary)


def run_online(algo: Algo, *, prompts: str, model: str, out: str,
               config_path: str | None = None, overrides: Sequence[str] = (),
               ray_address: str | None = None, reward_fn: RewardFn | None = None,
               on_iteration: IterationCallback | None = None) -> OnlineResult:
    """What `prefloop train grpo|rs|online-dpo` and the training rounds call.

    Resolves the config (bundled defaults -> config_path -> overrides -> prompts/model/out) and
    runs it; see train_online for the other arguments.
    """
    items = [*overrides, f"prompts={prompts}", f"model={model}", f"out={out}"]
    config = load_online_config(algo, config_path, items)
    return train_online(config, ray_address=ray_address, reward_fn=reward_fn,
                        on_iteration=on_iteration)


__all__ = ["evaluate", "run_online", "train_online"]
