"""Multi-process DeepSpeed on CPU: 2 ranks (gloo) train exactly like one process.

Each rank takes a disjoint shard of every micro-batch; the loss is divided by the whole batch's
weight total and DeepSpeed's gradient average is undone, so after N steps the weights equal a
one-process run's with the same global batch. Rank 0 alone writes checkpoints (every rank its
DeepSpeed shard), and a 2-rank run resumed from a checkpoint equals an uninterrupted one. The
first DeepSpeed start on a machine JIT-builds a communication extension (~40 s, cached in
TORCH_EXTENSIONS_DIR).
"""

from __future__ import annotations

import json
import math

import pytest

from tests.training.conftest import BAD, GOOD, QUESTIONS, write_jsonl
from tests.training.multirank import run_ranks
from tests.training.test_training_trainer_on_cpu import metrics, run, weights
from training import checkpoint as ckpt

pytest.importorskip("deepspeed")

# 7 pairs, micro-batch 2 over both ranks, 2 micro-batches a step: an epoch is a full step and a
# step of 3 pairs whose last micro-batch has 1 pair (rank 1 runs a weight-0 filler there).
# Four steps = two epochs, so the reference walk and the sample order span an epoch boundary.
ARGS = ["max_steps=4", "batch_size=2", "grad_accum_steps=2", "save_steps=2", "seed=3"]


@pytest.mark.slow
def test_two_ranks_equal_one_process_and_resume_exactly(tiny_model_dir, tmp_path):
    import torch

    triples = enumerate(zip(QUESTIONS, GOOD, BAD, strict=True))
    rows = [{"prompt": f"Question: {q}\nAnswer:", "chosen": f" {g}", "rejected": f" {b}",
             "weight": 1.0 + 0.25 * i} for i, (q, g, b) in triples]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows[:7])
    common = {"data": str(data), "model": str(tiny_model_dir), "deepspeed": "zero2"}

    def job(out: str, **extra):
        return {"mode": "dpo", "out": str(tmp_path / out), "overrides": ARGS, **common, **extra}

    run_ranks(2, [job("ranks2"), job("ranks2-resumed", crash_after=3),
                  job("ranks2-resumed", resume=True)])
    single = run("dpo", data, tiny_model_dir, tmp_path / "single", *ARGS)

    two, one = metrics(tmp_path / "ranks2"), metrics(single.run_dir)
    assert [r["step"] for r in two] == [1, 2, 3, 4]  # rank 0 alone logs
    assert [r["train/sample_ids"] for r in two] == [r["train/sample_ids"] for r in one]
    assert [len(r["train/sample_ids"]) for r in two] == [4, 3, 4, 3]
    assert two[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    # Every pair counted once over both ranks (the filler adds nothing): the shards are disjoint.
    assert [r["train/examples"] for r in two] == [4, 3, 4, 3]
    # Equal up to float rounding (other batch shapes per rank, the all-reduce's summation order).
    for key, rel in (("train/loss", 1e-6), ("train/grad_norm", 5e-5),
                     ("train/rewards/margin", 1e-5)):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=rel, abs=1e-6)
    w_two, w_one = weights(tmp_path / "ranks2" / "model"), weights(single.model_dir)
    assert w_two.keys() == w_one.keys()
    for name in w_one:  # observed max difference 3e-6 (lr 1e-3, 4 Adam steps)
        torch.testing.assert_close(w_two[name], w_one[name], rtol=0, atol=1e-5)

    # Interrupted after step 3 (last checkpoint: step 2), resumed on 2 ranks: same as straight.
    resumed = metrics(tmp_path / "ranks2-resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["train/sample_ids"] for r in resumed] == [r["train/sample_ids"] for r in two]
    assert [r["train/loss"] for r in resumed] == pytest.approx(
        [r["train/loss"] for r in two], abs=1e-6)
    w_resumed = weights(tmp_path / "ranks2-resumed" / "model")
    for name in w_two:
        torch.testing.assert_close(w_resumed[name], w_two[name], rtol=0, atol=1e-6)
    info = json.loads((tmp_path / "ranks2-resumed" / "run.json").read_text())
    assert info["world_size"] == 2 and info["resumed_from_step"] == 2
    assert info["steps_done"] == 4

    # One published checkpoint per save, each with both ranks' ZeRO optimizer shards.
    latest = ckpt.latest_checkpoint(tmp_path / "ranks2-resumed")
    assert latest is not None and latest.name == "step-00000004"
    shards = sorted(p.name for p in (latest / "deepspeed" / "state").glob("*optim_states.pt"))
    assert len(shards) == 2, shards
    assert not list(ckpt.checkpoint_root(tmp_path / "ranks2").glob(".tmp-*"))


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_shards_are_disjoint_cover_each_micro_batch_and_own_each_reference_once(world_size):
    from training.data_parallel import Ranks, Schedule, reference_batches, reference_plan, shard

    schedule = Schedule(num_examples=11, batch_size=4, grad_accum_steps=2, seed=5, total_steps=5)
    everyone = [Ranks(rank, world_size) for rank in range(world_size)]
    for step in range(schedule.total_steps):
        for micro in schedule.micro_batches(step):
            parts = [shard(micro, ranks) for ranks in everyone]
            assert sorted(i for part in parts for i in part) == sorted(micro)
    plans = [reference_plan(schedule, ranks) for ranks in everyone]
    owned = [i for plan in plans for _, own in plan for i in own]
    assert sorted(owned) == list(range(11))  # each example scored once, by one rank
    for plan in plans:
        assert all(set(own) <= set(part) for part, own in plan)
    if world_size == 1:
        assert [part for part, _ in plans[0]] == reference_batches(schedule)
