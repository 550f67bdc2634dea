"""Stage 5, train: the candidate trained from the deployed policy on the round's export
(dpo/kto: `prefloop train`'s trainer; ppo: training.ppo; grpo/rs: training.online), and
registered as a candidate policy version in the stage's one transaction.

Training is idempotent on its run folder: a finished run (the `round_train.json` marker) is
returned as is and an interrupted dpo/kto run resumes from its last complete checkpoint, so a
resumed round never trains a step twice.

    prefloop round run --algo dpo --set train.overrides='["max_steps=2"]' --no-ray
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlmodel import Session

from loop.config import RoundConfig
from loop.stages.common import StageContext, StageResult, set_threads
from store.models import Round

TRAIN_DONE = "round_train.json"  # written once a round's training finished; its presence = done


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
    set_threads()
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
    set_threads()
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


def run(ctx: StageContext, rnd: Round, config: RoundConfig) -> StageResult:
    """Train the candidate from the deployed policy; register it as a candidate version."""
    from store import deployments

    assert rnd.id is not None
    metrics = rnd.metrics or {}
    collect, dataset = metrics["collect"], metrics["build_dataset"]
    if config.algo in ("dpo", "kto") and dataset["rows"] == 0:
        return StageResult({"skipped": "the round's export has no training rows"})
    run_dir = ctx.run_dir(rnd)
    reward_model = config.train.reward_model
    if config.algo == "ppo" and reward_model == "round":
        reward_model = ctx.compute(
            config, train_reward_model, data=dataset["path"], model=collect["policy_dir"],
            run_dir=str(run_dir / "reward_model"),
            overrides=config.train.reward_model_overrides)
    kwargs = {"data": dataset["path"], "prompts": dataset["prompts_path"],
              "model": collect["policy_dir"], "run_dir": str(run_dir / "policy_run"),
              "config_path": config.train.config, "overrides": config.train.overrides,
              "reward_model": reward_model, "online_ray_address": config.ray_address}
    if config.algo in ("dpo", "kto"):
        result = ctx.compute(config, train_policy, config.algo, **kwargs)
    else:  # the online algorithms place their own Ray actors
        result = train_policy(config.algo, **kwargs)
    ctx.trainer_calls += int(bool(result.get("trained")))
    round_id = rnd.id

    def write(session: Session) -> dict[str, Any]:
        candidate = deployments.register_policy(
            session, name=f"round-{round_id}", base_model=config.base_model,
            weights_uri=str(result["model_dir"]), parent_id=collect["policy_id"],
            round_id=round_id)
        return {"candidate_id": candidate.id, "candidate_name": candidate.name}

    outputs = {"model_dir": str(result["model_dir"]), "steps": result.get("steps"),
               "train_metrics": result.get("metrics", {}),
               "trained_in_this_attempt": bool(result.get("trained")),
               "train_s": result.get("train_s"), "reward_model": reward_model}
    return StageResult(outputs, write)
