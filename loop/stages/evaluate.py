"""Stage 6, evaluate: candidate vs deployed on the held-out prompts. Both answer every prompt
(a Ray task: `evaluate_policies`), rule judges score both, the candidate's KL to the reference is
measured along its answers, and pairwise eval tasks (candidate vs deployed, canonical order
alternating) are labelled by the round's judges; the gate judge's win rate is what decide uses.

The eval completions and tasks are one transaction of get-or-create rows; the judges are
idempotent (one label per task and judge). The KL math (`token_kl`) is a pure function on
tensors.

    python -m pytest -q tests/loop/stages/test_evaluate_kl.py
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlmodel import Session

from loop.config import RoundConfig
from loop.decision import win_rates
from loop.stages.common import StageContext, StageResult, set_threads
from loop.stages.generate import sampling_params
from loop.stages.judging import judge_configs, run_judges
from store import repo
from store.models import Round, TaskKind

if TYPE_CHECKING:
    import torch


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
                   *, batch_size: int = 16) -> list[float]:
    """Summed per-position KL(policy || reference) along each completion, in batches.

    Args:
        policy, reference: generation engines (training.generation.GenerationEngine): their
            `completion_logits` run the teacher-forced pass in the generation dtype, the
            prompts' shared prefix once. The same engine twice gives zeros without a pass.
        sequences: (prompt + completion token ids, number of prompt tokens) per row.
    Returns:
        One float per row (0.0 for an empty completion).
    """
    kls = [0.0] * len(sequences)
    if reference is policy:
        return kls
    rows = [i for i, (ids, n_prompt) in enumerate(sequences) if len(ids) > n_prompt]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        pairs = [(list(sequences[i][0][:sequences[i][1]]), list(sequences[i][0][sequences[i][1]:]))
                 for i in chunk]
        for i, p_logits, r_logits in zip(chunk, policy.completion_logits(pairs),
                                         reference.completion_logits(pairs), strict=True):
            kls[i] = float(token_kl(p_logits, r_logits).sum())
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
    set_threads()
    from training.rollout import HFRolloutEngine

    timings: dict[str, float] = {}
    sampling = sampling_params({"temperature": 0.0, **params}, n=1)  # greedy by default
    started = time.perf_counter()
    candidate_engine = HFRolloutEngine(candidate_dir, dtype=dtype, batch_size=batch_size)
    candidate = [group[0] for group in candidate_engine.generate(list(prompts), sampling)]
    deployed_engine = HFRolloutEngine(deployed_dir, dtype=dtype, batch_size=batch_size)
    deployed = [group[0] for group in deployed_engine.generate(list(prompts), sampling)]
    timings["generate_s"] = time.perf_counter() - started  # model loads included

    # The KL runs on the generation engines, in the generation dtype; the reference is the
    # candidate's or the deployed policy's engine when it is one of them.
    started = time.perf_counter()
    policy = candidate_engine.engine
    where = str(Path(reference_dir).resolve())
    if where == str(Path(candidate_dir).resolve()):
        reference = policy
    elif where == str(Path(deployed_dir).resolve()):
        reference = deployed_engine.engine
    else:
        del deployed_engine
        reference = HFRolloutEngine(reference_dir, dtype=dtype, batch_size=batch_size).engine
    kls = trajectory_kls(policy, reference,
                         [(list(r.prompt_ids) + list(r.completion_ids), len(r.prompt_ids))
                          for r in candidate], batch_size=max(1, min(batch_size, 16)))
    timings["kl_s"] = time.perf_counter() - started
    return {"candidate": [r.text for r in candidate], "deployed": [r.text for r in deployed],
            "candidate_tokens": [len(r.completion_ids) for r in candidate], "kl": kls,
            "timings": timings}


# ---------------------------------------------------------------------------------------------
# The stage


def run(ctx: StageContext, rnd: Round, config: RoundConfig) -> StageResult:
    """Candidate vs deployed on the held-out prompts: judges' win rates (both orders for
    LLM judges), rule rewards, KL to the reference."""
    from feedback.config import RuleJudgeConfig
    from feedback.rules import score_response

    assert rnd.id is not None
    metrics = rnd.metrics or {}
    collect, train = metrics["collect"], metrics["train"]
    if "candidate_id" not in train:
        return StageResult({"skipped": train.get("skipped", "no candidate")})
    ev = config.evaluate
    prompts = ctx.prompts(collect["heldout_prompt_ids"])
    reference_dir = collect["base_dir"] if ev.kl_reference == "base" else \
        collect["policy_dir"]
    params = {"max_new_tokens": ev.max_new_tokens, "seed": config.seed,
              "temperature": ev.temperature, "stop": list(config.generate.stop),
              "include_stop": True}
    result = ctx.compute(config, evaluate_policies, train["model_dir"],
                         collect["policy_dir"], reference_dir,
                         [p.content for p in prompts], params,
                         dtype=config.generate.dtype, batch_size=config.generate.batch_size)
    judges = judge_configs(ctx, ev.judges or config.label.judges)
    rule = next((j for j in judges if isinstance(j, RuleJudgeConfig)), None)
    reward: dict[str, Any] = {}
    if rule is not None:
        for who in ("candidate", "deployed"):
            scores = [score_response(rule.checks, text, p.reference)
                      for text, p in zip(result[who], prompts, strict=True)]
            reward[who] = sum(s.score or 0.0 for s in scores) / len(scores)
            for i, check in enumerate(rule.checks):
                applied = [v for s in scores if (v := s.per_check[i]) is not None]
                reward[f"{who}/{check.type}_{i}"] = (sum(applied) / len(applied)
                                                     if applied else None)
    source = f"round:{rnd.id}:eval"
    round_id = rnd.id
    candidate_id, deployed_id = train["candidate_id"], collect["policy_id"]

    # An empty answer cannot be stored or judged: it loses to any answer, ties with another
    # empty one (counted here, outside the judges, and added to every judge's tally).
    empty: Counter[str] = Counter()
    for cand, dep in zip(result["candidate"], result["deployed"], strict=True):
        if not cand.strip() or not dep.strip():
            empty["both" if not cand.strip() and not dep.strip() else
                  "candidate_only" if not cand.strip() else "deployed_only"] += 1

    def write(session: Session) -> dict[int, bool]:
        order: dict[int, bool] = {}
        for index, (prompt, cand, dep) in enumerate(zip(prompts, result["candidate"],
                                                        result["deployed"], strict=True)):
            if not cand.strip() or not dep.strip():
                continue
            c = repo.get_or_create_completion(
                session=session, prompt_id=prompt.id or 0, content=cand,
                origin=f"policy:{candidate_id}", policy_version_id=candidate_id,
                generation={"round_id": round_id, "eval": True, "temperature": 0.0})
            d = repo.get_or_create_completion(
                session=session, prompt_id=prompt.id or 0, content=dep,
                origin=f"policy:{deployed_id}", policy_version_id=deployed_id,
                generation={"round_id": round_id, "eval": True, "temperature": 0.0})
            # Alternate which policy is canonical position a (LLM judges also swap).
            first = index % 2 == 0
            ids = [c.id or 0, d.id or 0] if first else [d.id or 0, c.id or 0]
            task, _ = repo.get_or_create_task(session=session, kind=TaskKind.pairwise,
                                              prompt_id=prompt.id or 0, completion_ids=ids,
                                              round_id=round_id, source=source)
            stored = repo.task_completion_ids(session=session, task_id=task.id or 0)
            order[task.id or 0] = stored[0] == c.id
        return order

    # The eval tasks are committed before the judges run: the judges read them from the store.
    candidate_first = ctx.db.run_write(write)
    judge_stats = run_judges(ctx, judges, rnd.id, source, ev.ai_task_limit)
    with ctx.db.read() as session:
        rates = win_rates(session, list(candidate_first), candidate_first, empty=empty,
                          judges=[j.annotator_name for j in judges])
    gate = ev.gate_judge or judges[0].annotator_name
    gate_stats = rates.get(gate, {})
    gate_rate = gate_stats.get("win_rate" if ev.ties == "half" else "decisive_win_rate")
    kls = result["kl"]
    outputs = {"win_rate": gate_rate, "gate_judge": gate, "ties": ev.ties,
               "decisive": gate_stats.get("wins", 0) + gate_stats.get("losses", 0),
               "win_rates": rates,
               "reward": reward, "kl": sum(kls) / len(kls) if kls else 0.0,
               "kl_reference": ev.kl_reference, "n_prompts": len(prompts),
               "n_tasks": len(candidate_first), "judges": judge_stats,
               "empty_answers": dict(empty),
               "mean_tokens": sum(result["candidate_tokens"]) / max(len(prompts), 1),
               "timings": result["timings"],
               "samples": [{"prompt_id": p.id, "candidate": c[:300], "deployed": d[:300]}
                           for p, c, d in list(zip(prompts, result["candidate"],
                                                   result["deployed"], strict=True))[:3]]}
    return StageResult(outputs)
