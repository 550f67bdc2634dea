"""The compute of a round's stages: sampling, training, evaluation. No database in here.

Each function takes paths and plain data and returns plain data, so it can run in this process or
as a Ray task on another machine (`run_compute`); the round driver (feedback/rounds.py) does every
database write itself, in the transaction that advances the round. The math (per-token KL) is a
pure function on tensors.

    python -c "from feedback.stages import sample_completions as s; print(s('smollm2-135m-instruct',
        ['What is 2+3?'], {'n': 2, 'max_new_tokens': 32, 'seed': 0}))"
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
TRAIN_DONE = "round_train.json"  # written once a round's training finished; its presence = done


# ---------------------------------------------------------------------------------------------
# Ray


def run_compute(fn: Callable[..., T], *args: Any, use_ray: bool, ray_address: str | None = None,
                num_cpus: int = 2, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` here, or as one Ray task (local Ray unless `ray_address`).

    Ray's default is at-most-once (`max_retries=0` here too): every function run this way is
    idempotent on its outputs (fixed seeds, run folders that resume), so the driver may simply
    call it again after a failure.
    """
    if not use_ray:
        return fn(*args, **kwargs)
    import ray

    from training.raycluster import ensure_ray

    if not ray_address:
        # Ray starts local workers at niceness 15: on a busy machine a stage's task then gets a
        # fraction of a core behind everything else. The local raylet reads this at start.
        os.environ.setdefault("RAY_worker_niceness", "0")
    ensure_ray(ray_address, num_cpus=None if ray_address else max(num_cpus, os.cpu_count() or 1))
    remote = ray.remote(num_cpus=num_cpus, max_retries=0)(fn)
    result: T = ray.get(remote.remote(*args, **kwargs))
    return result


def _set_threads() -> None:
    # Ray sets OMP_NUM_THREADS to the task's num_cpus; torch must follow it explicitly.
    import torch

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))


# ---------------------------------------------------------------------------------------------
# Sampling


def _sampling_params(params: dict[str, Any], **forced: Any) -> Any:
    """training.rollout.SamplingParams from a stage's JSON params (the `stop` list becomes a
    tuple); `forced` values override the params."""
    from training.rollout import SamplingParams

    values = {k: (tuple(v) if k == "stop" else v) for k, v in params.items()}
    return SamplingParams(**{**values, **forced})


def sample_completions(model_dir: str, prompts: Sequence[Any], params: dict[str, Any], *,
                       dtype: str = "float32", batch_size: int = 16
                       ) -> list[list[dict[str, Any]]]:
    """K samples per prompt from the policy in `model_dir` (A's HFRolloutEngine).

    Returns, per prompt, a list of {"text", "finish_reason", "completion_tokens"}.
    """
    _set_threads()
    from training.rollout import HFRolloutEngine

    engine = HFRolloutEngine(model_dir, dtype=dtype, batch_size=batch_size)
    sampling = _sampling_params(params)
    rollouts = engine.generate(list(prompts), sampling)
    return [[{"text": r.text, "finish_reason": r.finish_reason,
              "completion_tokens": len(r.completion_ids)} for r in group] for group in rollouts]


# ---------------------------------------------------------------------------------------------
# KL along a trajectory (pure)


def token_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(pi(.|prefix) || pi_ref(.|prefix)) at each position, over the whole vocabulary.

    Args:
        policy_logits, reference_logits: (T, V) logits at the positions that predict the
            completion tokens.
    Returns:
        (T,) per-position KL in nats. Summed over a completion it is the KL of the two
        next-token distributions along that trajectory (no sampling estimator needed: the
        per-position KL is exact, only the trajectory is one sample).
    """
    import torch

    logp = torch.log_softmax(policy_logits.float(), dim=-1)
    logq = torch.log_softmax(reference_logits.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(dim=-1)


def trajectory_kls(policy: Any, reference: Any, sequences: Sequence[tuple[Sequence[int], int]],
                   *, pad_id: int = 0, batch_size: int = 8) -> list[float]:
    """Summed per-position KL(policy || reference) along each completion, in batches.

    Args:
        sequences: (prompt + completion token ids, number of prompt tokens) per row.
        pad_id: any token id; padding sits to the right of every real token, so causal
            attention never lets it change a real position's logits.
    Returns:
        One float per row (0.0 for an empty completion).
    """
    import torch

    from training.data import collate_sequences

    kls = [0.0] * len(sequences)
    rows = [i for i, (ids, n_prompt) in enumerate(sequences) if len(ids) > n_prompt]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = collate_sequences([list(sequences[i][0][:sequences[i][1]]) for i in chunk],
                                  [list(sequences[i][0][sequences[i][1]:]) for i in chunk],
                                  pad_id)
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        with torch.no_grad():
            policy_logits = policy(input_ids=input_ids, attention_mask=mask).logits
            reference_logits = (policy_logits if reference is policy else
                                reference(input_ids=input_ids, attention_mask=mask).logits)
        for row, i in enumerate(chunk):
            length, n_prompt = len(sequences[i][0]), sequences[i][1]
            # Logits at position t predict token t+1: the completion tokens are predicted by
            # positions n_prompt-1 .. len-2.
            span = slice(n_prompt - 1, length - 1)
            kls[i] = float(token_kl(policy_logits[row, span], reference_logits[row, span]).sum())
    return kls


# ---------------------------------------------------------------------------------------------
# Evaluation: candidate vs deployed on held-out prompts


def evaluate_policies(candidate_dir: str, deployed_dir: str, reference_dir: str,
                      prompts: Sequence[Any], params: dict[str, Any], *, dtype: str = "float32",
                      batch_size: int = 16) -> dict[str, Any]:
    """One answer of each policy to every held-out prompt (greedy unless `params` sets a
    temperature; sampled answers are seeded), and the candidate's KL to the reference along its
    own answers.

    Returns {"candidate": [text...], "deployed": [text...], "kl": [nats per prompt],
    "candidate_tokens": [...], "timings": {...}}.
    """
    _set_threads()
    import torch

    from training.models import load_policy
    from training.rollout import HFRolloutEngine

    timings: dict[str, float] = {}
    sampling = _sampling_params({"temperature": 0.0, **params}, n=1)  # greedy by default
    started = time.perf_counter()
    engine = HFRolloutEngine(candidate_dir, dtype=dtype, batch_size=batch_size)
    candidate = [group[0] for group in engine.generate(list(prompts), sampling)]
    del engine
    engine = HFRolloutEngine(deployed_dir, dtype=dtype, batch_size=batch_size)
    deployed = [group[0] for group in engine.generate(list(prompts), sampling)]
    del engine
    timings["generate_s"] = time.perf_counter() - started

    started = time.perf_counter()
    policy = load_policy(candidate_dir, dtype=torch.float32).eval()
    reference = policy if Path(reference_dir).resolve() == Path(candidate_dir).resolve() else \
        load_policy(reference_dir, dtype=torch.float32).eval()
    kls = trajectory_kls(policy, reference,
                         [(list(r.prompt_ids) + list(r.completion_ids), len(r.prompt_ids))
                          for r in candidate], batch_size=max(1, min(batch_size, 16)))
    timings["kl_s"] = time.perf_counter() - started
    return {"candidate": [r.text for r in candidate], "deployed": [r.text for r in deployed],
            "candidate_tokens": [len(r.completion_ids) for r in candidate], "kl": kls,
            "timings": timings}


# ---------------------------------------------------------------------------------------------
# Training


def _merge_if_adapter(model_dir: Path, out_dir: Path) -> Path:
    """A full Hugging Face folder for the trained policy (LoRA runs are merged, contract)."""
    if not (model_dir / "adapter_config.json").exists():
        return model_dir
    if (out_dir / "config.json").exists() and (out_dir / ".merged").exists():
        return out_dir
    from training.models import merge_adapter

    merged = Path(merge_adapter(str(model_dir), str(out_dir)))
    (merged / ".merged").write_text("ok\n")
    return merged


def train_policy(algo: str, *, data: str, prompts: str, model: str, run_dir: str,
                 config_path: str | None, overrides: Sequence[str],
                 reward_model: str | None = None, online_ray_address: str | None = None
                 ) -> dict[str, Any]:
    """Train the round's candidate from `model`; returns {"model_dir", "steps", "metrics",
    "trained"}. Idempotent: a finished run (marker file) is returned as is, an interrupted
    dpo/kto run resumes from its last complete checkpoint, so no step is trained twice."""
    out = Path(run_dir)
    marker = out / TRAIN_DONE
    if marker.exists():
        return {**json.loads(marker.read_text()), "trained": False}
    _set_threads()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if algo in ("dpo", "kto"):
        from training import checkpoint as ckpt
        from training.trainer import train_from_cli

        train_dir = out / "train"
        resume = train_dir.exists() and ckpt.latest_checkpoint(train_dir) is not None
        result = train_from_cli(algo, data=data, model=model, out=str(train_dir),
                                config_path=Path(config_path) if config_path else None,
                                overrides=list(overrides), resume=resume)
        model_dir = _merge_if_adapter(result.model_dir, out / "policy")
        summary = {"model_dir": str(model_dir), "steps": result.steps,
                   "metrics": result.final_metrics, "resumed": resume,
                   "data_sha256": result.data_sha256}
    elif algo == "ppo":
        from training.ppo import run_ppo

        online = run_ppo(prompts=prompts, model=model, reward_model=reward_model,
                         out=str(out / "train"), config_path=config_path,
                         overrides=list(overrides), ray_address=online_ray_address)
        summary = {"model_dir": str(online.model_dir), "steps": online.steps,
                   "metrics": online.metrics}
    else:
        from training.online import run_online

        online_algo: Any = algo  # grpo | rs
        online = run_online(online_algo,
                            prompts=prompts, model=model, out=str(out / "train"),
                            config_path=config_path, overrides=list(overrides),
                            ray_address=online_ray_address)
        summary = {"model_dir": str(online.model_dir), "steps": online.steps,
                   "metrics": online.metrics}
    summary["train_s"] = time.perf_counter() - started
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, default=float) + "\n")
    os.replace(tmp, marker)  # published by rename: present means complete
    return {**summary, "trained": True}


def train_reward_model(*, data: str, model: str, run_dir: str, overrides: Sequence[str]) -> str:
    """A reward model on the round's preference export (for PPO), resumable like train_policy."""
    _set_threads()
    from training import checkpoint as ckpt
    from training.trainer import train_from_cli

    out = Path(run_dir)
    if (out / "model" / "config.json").exists() or (out / "model" / "adapter_config.json"
                                                    ).exists():
        return str(out / "model")
    resume = out.exists() and ckpt.latest_checkpoint(out) is not None
    result = train_from_cli("rm", data=data, model=model, out=str(out), overrides=list(overrides),
                            resume=resume)
    return str(result.model_dir)
