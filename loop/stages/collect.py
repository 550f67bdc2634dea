"""Stage 1, collect: the deployed policy (the base model on a fresh store) and the round's
prompts: a new seeded sample of train prompts every round, the same held-out prompts every round.

Its one transaction deploys the base model if nothing is deployed and stores the prompts
(get-or-create, so a rerun adds nothing).

    python -c "from loop.stages.collect import arithmetic_prompts; print(arithmetic_prompts(2, 0,
        'train'))"
"""

from __future__ import annotations

import json
import random
from typing import Any

from sqlmodel import Session

from loop.config import RoundConfig
from loop.stages.common import StageContext, StageResult
from store import repo
from store import rounds as store_rounds
from store.errors import InvalidInput
from store.models import Round


def arithmetic_prompts(n: int, seed: int, split: str) -> list[dict[str, Any]]:
    """The seeded verifiable task's prompts as {"prompt", "answer", "id"} (training.tasks)."""
    from training.tasks import make_arithmetic_prompts

    return [{"prompt": row["prompt"], "answer": str(row["answer"]), "id": row["id"]}
            for row in make_arithmetic_prompts(n, seed, split)]


def store_prompts(ctx: StageContext, config: RoundConfig, round_id: int
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A seeded sample of the stored train split, and the first held-out prompts."""
    task = config.task
    with ctx.db.read() as session:
        def rows(split: str) -> list[dict[str, Any]]:
            return [{"prompt": p.content, "answer": p.reference, "id": p.id}
                    for p in store_rounds.split_prompts(session, task.dataset, split)]
        train, heldout = rows(task.train_split), rows(task.heldout_split)
    if not train or not heldout:
        raise InvalidInput(f"dataset {task.dataset!r} needs prompts in splits "
                           f"{task.train_split!r} and {task.heldout_split!r}")
    rng = random.Random(task.seed * 100_003 + round_id)
    return (rng.sample(train, min(task.train_prompts, len(train))),
            heldout[:task.heldout_prompts])


def run(ctx: StageContext, rnd: Round, config: RoundConfig) -> StageResult:
    """The deployed policy (the base model on a fresh store) and the round's prompts."""
    from training.models import resolve_model

    assert rnd.id is not None
    run_dir = ctx.run_dir(rnd)
    (run_dir / "round_config.json").write_text(json.dumps(rnd.config, indent=2) + "\n")
    base_dir = resolve_model(config.base_model)
    task = config.task
    if task.kind == "arithmetic":
        train = arithmetic_prompts(task.train_prompts, task.seed * 100_003 + rnd.id,
                                   task.train_split)
        heldout = arithmetic_prompts(task.heldout_prompts, task.seed, task.heldout_split)
    else:
        train, heldout = store_prompts(ctx, config, rnd.id)
    round_id = rnd.id

    def write(session: Session) -> dict[str, Any]:
        policy = store_rounds.ensure_deployed(session, base_model=config.base_model,
                                              weights_uri=base_dir, actor=f"round:{round_id}")
        ids: dict[str, list[int]] = {"train": [], "heldout": []}
        for split, rows, split_name in (("train", train, task.train_split),
                                        ("heldout", heldout, task.heldout_split)):
            for row in rows:
                prompt = repo.get_or_create_prompt(
                    session=session, content=row["prompt"], dataset=task.dataset,
                    split=split_name, reference=row.get("answer") or None)
                # A train prompt that is already stored under another split (e.g. held
                # out) is not used for training: no leak from eval into training.
                if prompt.split == split_name and prompt.id not in ids[split]:
                    ids[split].append(prompt.id or 0)
        return {"policy_id": policy.id, "policy_name": policy.name,
                "policy_dir": policy.weights_uri, "base_dir": base_dir,
                "train_prompt_ids": ids["train"], "heldout_prompt_ids": ids["heldout"],
                "label_watermark": store_rounds.max_label_id(session)}

    return StageResult({"run_dir": str(run_dir)}, write)
