"""Stage 2, generate: K samples per train prompt from the deployed policy, and tasks over them.

The compute (`sample_completions`) takes paths and plain data, so it runs here or as a Ray task;
the one transaction stores the completions and the pairwise / listwise / binary tasks, all
get-or-create keyed (the same seed gives the same samples), so a rerun adds nothing twice.

    python -c "from loop.stages.generate import sample_completions as s; print(s(
        'smollm2-135m-instruct', ['What is 2+3?'], {'n': 2, 'max_new_tokens': 32, 'seed': 0}))"
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Sequence
from itertools import combinations
from typing import Any

from sqlmodel import Session

from loop.config import RoundConfig
from loop.stages.common import StageContext, StageResult, set_threads
from store import repo
from store.models import Round, TaskKind


def sampling_params(params: dict[str, Any], **forced: Any) -> Any:
    """training.rollout.SamplingParams from a stage's JSON params (the `stop` list becomes a
    tuple); `forced` values override the params."""
    from training.rollout import SamplingParams

    values = {k: (tuple(v) if k == "stop" else v) for k, v in params.items()}
    return SamplingParams(**{**values, **forced})


def sample_completions(model_dir: str, prompts: Sequence[Any], params: dict[str, Any], *,
                       dtype: str = "float32", batch_size: int = 16
                       ) -> list[list[dict[str, Any]]]:
    """K samples per prompt from the policy in `model_dir` (training.rollout.HFRolloutEngine).

    Returns, per prompt, a list of {"text", "finish_reason", "completion_tokens"}.
    """
    set_threads()
    from training.rollout import HFRolloutEngine

    engine = HFRolloutEngine(model_dir, dtype=dtype, batch_size=batch_size)
    sampling = sampling_params(params)
    rollouts = engine.generate(list(prompts), sampling)
    return [[{"text": r.text, "finish_reason": r.finish_reason,
              "completion_tokens": len(r.completion_ids)} for r in group] for group in rollouts]


def run(ctx: StageContext, rnd: Round, config: RoundConfig) -> StageResult:
    """K samples per train prompt from the deployed policy; tasks over them."""
    assert rnd.id is not None
    collect = (rnd.metrics or {})["collect"]
    gen = config.generate
    prompts = ctx.prompts(collect["train_prompt_ids"])
    seed = config.seed * 1_000_003 + rnd.id
    params = {"n": gen.samples_per_prompt, "temperature": gen.temperature,
              "top_p": gen.top_p, "max_new_tokens": gen.max_new_tokens, "seed": seed,
              "stop": list(gen.stop), "include_stop": True}
    started = time.perf_counter()
    samples = ctx.compute(config, sample_completions, collect["policy_dir"],
                          [p.content for p in prompts], params, dtype=gen.dtype,
                          batch_size=gen.batch_size)
    sample_s = time.perf_counter() - started
    policy_id, round_id = collect["policy_id"], rnd.id
    source = f"round:{round_id}"
    kind = TaskKind(gen.task_kind)

    def write(session: Session) -> dict[str, Any]:
        counts: Counter[str] = Counter()
        rng = random.Random(seed)
        for prompt, group in zip(prompts, samples, strict=True):
            ids: list[int] = []
            for index, sample in enumerate(group):
                counts["samples"] += 1
                if not sample["text"].strip():
                    counts["empty"] += 1
                    continue
                completion = repo.get_or_create_completion(
                    session=session, prompt_id=prompt.id or 0, content=sample["text"],
                    origin=f"policy:{policy_id}", policy_version_id=policy_id,
                    generation={"round_id": round_id, "sample_index": index,
                                "temperature": gen.temperature, "seed": seed,
                                "finish_reason": sample["finish_reason"]})
                if completion.id not in ids:
                    ids.append(completion.id or 0)
            counts["distinct"] += len(ids)
            groups: list[list[int]]
            if kind == TaskKind.binary:
                groups = [[i] for i in ids]
            elif kind == TaskKind.listwise:
                groups = [ids[:16]] if len(ids) >= 2 else []
            else:
                pairs = [list(p) for p in combinations(ids, 2)]
                rng.shuffle(pairs)
                groups = pairs[:gen.max_pairs_per_prompt]
            for group_ids in groups:
                _task, created = repo.get_or_create_task(
                    session=session, kind=kind, prompt_id=prompt.id or 0,
                    completion_ids=group_ids, round_id=round_id, overlap=gen.overlap,
                    source=source)
                counts["tasks"] += 1
                counts["tasks_created"] += int(created)
        return dict(counts)

    return StageResult({"sample_s": round(sample_s, 3), "seed": seed}, write)
