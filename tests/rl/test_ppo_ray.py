"""PPO end to end on a local Ray with the tiny model: the four roles, the freeze, the reference,
the logged KL, colocation, data-parallel actor workers with global whitening, PPO-ptx.

Each run starts its Ray actors (about 30-60 s on 2 cores: every worker imports torch), so the
runs are module-scoped and several assertions share one run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from training.ppo_config import PPOConfig

TINY = ["rollout_batch_size=4", "mini_batch_size=2", "max_new_tokens=6", "lora=off",
        "actor_lr=1e-3", "critic_lr=3e-3", "warmup_steps=0", "save_steps=1", "progress=false",
        "cpus_per_worker=0.25", "threads_per_worker=1", "temperature=1.0"]


def write_prompts(path: Path, n: int = 8) -> Path:
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
             "answer": str(2 * i), "id": f"q{i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory: pytest.TempPathFactory, tiny_policy_dir: Path,
            rl_tokenizer: Any) -> Path:
    """A reward-model folder as `prefloop train rm` saves it (full fine-tuning): the tiny
    backbone with a seeded scalar head."""
    from training.models import load_reward_backbone

    torch.manual_seed(11)
    model = load_reward_backbone(str(tiny_policy_dir), rl_tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("tiny-rm")
    model.save_pretrained(folder)
    rl_tokenizer.save_pretrained(folder)
    return folder


def initial_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from training.models import load_policy

    return {k: v.clone() for k, v in load_policy(str(model_dir)).named_parameters()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def kl_from_log(path: Path, estimator: str) -> tuple[float, torch.Tensor]:
    from training.rl_losses import kl_penalty, masked_mean

    logged = torch.load(path)
    kl = kl_penalty(logged["old_logp"], logged["ref_logp"], estimator) * logged["mask"]
    return float(masked_mean(kl, logged["mask"])), logged


# ------------------------------------------------------------------------------ one plain run


@pytest.fixture(scope="module")
def plain_run(local_ray: None, tmp_path_factory: pytest.TempPathFactory, tiny_policy_dir: Path,
              tiny_rm: Path) -> dict[str, Any]:
    """3 PPO iterations, actor frozen for the first, no colocation; states captured per step."""
    import ray

    from training.ppo import run_ppo

    root = tmp_path_factory.mktemp("ppo-plain")
    seen: dict[str, Any] = {"actor": {}, "ref": {}, "pids": set(), "count": None}

    def on_phase(step: int, phase: str, roles: Any) -> None:
        if phase != "done":
            return
        seen["count"] = roles.ray_actor_count
        seen["pids"] = {ray.get(h.ping.remote())["pid"] for h in roles.handles}
        seen["actor"][step] = ray.get(roles.actors[0].call.remote("actor", "trainable_state"))
        seen["ref"][step] = ray.get(roles.ref_for(0).call.remote("ref", "parameters_state"))

    result = run_ppo(prompts=str(write_prompts(root / "prompts.jsonl")),
                     model=str(tiny_policy_dir), reward_model=str(tiny_rm),
                     out=str(root / "run"), overrides=[*TINY, "steps=3", "freeze_actor_steps=1",
                                                       "kl_estimator=k3"],
                     on_phase=on_phase)
    return {"result": result, "seen": seen}


def test_ppo_runs_the_requested_steps_and_writes_a_full_model(plain_run: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM

    result = plain_run["result"]
    assert result.steps == 3
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [1, 2, 3]
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["steps_done"] == 3 and run["actor_optimizer_steps"] == 2 * 2  # 2 unfrozen x 2
    assert [r["critic/optimizer_steps"] for r in records] == [2, 4, 6]
    assert [r["actor/frozen"] for r in records] == [1.0, 0.0, 0.0]
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["freeze_actor_steps"] == 1 and config["kl_estimator"] == "k3"
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)  # a FULL HF folder
    assert (result.model_dir / "tokenizer_config.json").is_file()
    final = plain_run["seen"]["actor"][3]
    assert all(torch.equal(final[k], p) for k, p in model.named_parameters())


def test_learning_rates_follow_warmup_then_cosine_and_actor_below_critic(
        plain_run: dict[str, Any]) -> None:
    from training.optim import lr_factor

    result = plain_run["result"]
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
    kw: dict[str, Any] = {"warmup_steps": 0, "schedule": "cosine", "min_lr_ratio": 0.1}
    for record in records:
        done = int(record["critic/optimizer_steps"])
        assert record["critic/lr"] == pytest.approx(3e-3 * lr_factor(done, total_steps=6, **kw))
        if not record["actor/frozen"]:  # the actor's schedule starts after the freeze
            done = int(record["actor/optimizer_steps"])
            assert record["actor/lr"] == pytest.approx(1e-3 * lr_factor(done, total_steps=4, **kw))
    bundled = PPOConfig(prompts="p", model="m", out="o", reward="rule:format")
    from training.ppo_config import load_ppo_config

    shipped = load_ppo_config(None, ["prompts=p", "model=m", "out=o", "reward=rule:format"])
    assert bundled.actor_lr < bundled.critic_lr and shipped.actor_lr < shipped.critic_lr


def test_actor_is_frozen_then_trains_and_the_reference_never_changes(
        plain_run: dict[str, Any], tiny_policy_dir: Path) -> None:
    initial = initial_weights(tiny_policy_dir)
    actor, ref = plain_run["seen"]["actor"], plain_run["seen"]["ref"]
    assert same(actor[1], initial)  # step 1: critic warm-up only
    assert not same(actor[2], initial) and not same(actor[3], actor[2])
    for step in (1, 2, 3):
        assert all(torch.equal(ref[step][k], initial[k]) for k in initial)


def test_logged_kl_is_the_estimator_on_the_logged_log_probs(plain_run: dict[str, Any]) -> None:
    from training.rl_losses import end_of_sequence_rewards

    result = plain_run["result"]
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
    for record in records:
        kl, logged = kl_from_log(result.run_dir / "rollouts" / f"step-{record['step']:08d}.pt",
                                 "k3")
        assert record["ppo/kl"] == pytest.approx(kl, rel=1e-5, abs=1e-8)
        assert torch.allclose(logged["kl"], torch.load(
            result.run_dir / "rollouts" / f"step-{record['step']:08d}.pt")["kl"])
        # the token rewards are -beta*kl plus the normalised score on the last token
        expected = end_of_sequence_rewards(logged["scores_normalised"], logged["kl"],
                                           logged["mask"], record["ppo/kl_coef"])
        assert torch.allclose(logged["rewards"], expected, atol=1e-6)
    # reward normalisation: the running moments of every raw score so far
    from training.rl_losses import RunningMoments, gae

    moments = RunningMoments()
    for record in records:
        logged = torch.load(result.run_dir / "rollouts" / f"step-{record['step']:08d}.pt")
        assert torch.allclose(logged["scores_normalised"], moments.update(logged["scores"]).float(),
                              atol=1e-6)
        # GAE on the logged token rewards and critic values, then global whitening
        advantages, returns = gae(logged["rewards"], logged["values"], logged["mask"], 1.0, 0.95)
        assert torch.allclose(logged["raw_advantages"], advantages, atol=1e-5)
        assert torch.allclose(logged["returns"], returns, atol=1e-5)
    # at step 1 the actor is the reference: every per-token KL is 0 (same weights, same math)
    _, first = kl_from_log(result.run_dir / "rollouts" / "step-00000001.pt", "k3")
    assert float(first["kl"].abs().max()) < 1e-5


def test_four_roles_are_four_ray_actors_without_colocation(plain_run: dict[str, Any]) -> None:
    seen = plain_run["seen"]
    assert seen["count"] == 4 and len(seen["pids"]) == 4


# ------------------------------------------------------------------------------ colocated, N=2


@pytest.fixture(scope="module")
def colocated_run(local_ray: None, tmp_path_factory: pytest.TempPathFactory,
                  tiny_policy_dir: Path, tiny_rm: Path) -> dict[str, Any]:
    """Two data-parallel actor workers (each with its reference), critic+reward together,
    adaptive k1 KL and PPO-ptx."""
    import ray

    from training.ppo import run_ppo

    root = tmp_path_factory.mktemp("ppo-colocated")
    sft = root / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"Q: {i}+{i}?\nA:", "completion": f" {2 * i}"})
                           + "\n" for i in range(6)))
    seen: dict[str, Any] = {"states": {}, "pids": set(), "count": None}

    def on_phase(step: int, phase: str, roles: Any) -> None:
        if phase == "done":
            seen["count"] = roles.ray_actor_count
            seen["pids"] = {ray.get(h.ping.remote())["pid"] for h in roles.handles}
            seen["states"][step] = ray.get([h.call.remote("actor", "trainable_state")
                                            for h in roles.actors])

    result = run_ppo(prompts=str(write_prompts(root / "prompts.jsonl")),
                     model=str(tiny_policy_dir), reward_model=str(tiny_rm),
                     out=str(root / "run"), colocate=["actor,ref", "critic,reward"],
                     overrides=[*TINY, "steps=2", "actor_workers=2", "kl_controller=adaptive",
                                "kl_target=0.001", "kl_horizon=10", "kl_coef=0.1",
                                f"ptx_data={sft}", "ptx_coef=0.5", "ptx_scale=fixed"],
                     on_phase=on_phase)
    return {"result": result, "seen": seen}


def test_colocation_creates_fewer_ray_actors(colocated_run: dict[str, Any]) -> None:
    seen = colocated_run["seen"]
    # (actor+ref) x 2 workers, (critic+reward) x 1
    assert seen["count"] == 3 and len(seen["pids"]) == 3
    run = json.loads((colocated_run["result"].run_dir / "run.json").read_text())
    assert run["layout"] == [["actor", "ref"], ["actor", "ref"], ["critic", "reward"]]


def test_two_actor_workers_whiten_with_global_statistics_and_stay_in_sync(
        colocated_run: dict[str, Any]) -> None:
    from training.rl_losses import masked_whiten

    result = colocated_run["result"]
    for step in (1, 2):
        logged = torch.load(result.run_dir / "rollouts" / f"step-{step:08d}.pt")
        assert logged["shard_sizes"].tolist() == [2, 2]
        mask, raw = logged["mask"], logged["raw_advantages"]
        # the advantages used for training were whitened with the moments of BOTH shards
        assert torch.allclose(logged["advantages"], masked_whiten(raw, mask), atol=1e-5)
        per_shard = torch.cat([masked_whiten(raw[:2], mask[:2]), masked_whiten(raw[2:], mask[2:])])
        assert not torch.allclose(logged["advantages"], per_shard, atol=1e-3)
    # gradients are all-reduced: both workers hold the same weights after every update
    for states in colocated_run["seen"]["states"].values():
        assert same(states[0], states[1])


def test_adaptive_kl_and_ptx_are_in_the_loop(colocated_run: dict[str, Any]) -> None:
    result = colocated_run["result"]
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
    first, second = records
    assert first["ppo/kl_coef"] == 0.1
    # Ziegler et al.: beta *= 1 + clip(KL/target - 1, -0.2, 0.2) * n / horizon
    error = min(max(first["ppo/kl_sequence"] / 0.001 - 1, -0.2), 0.2)
    assert second["ppo/kl_coef"] == pytest.approx(0.1 * (1 + error * 4 / 10))
    assert all(r["actor/ptx_loss"] > 0 for r in records)


def test_an_impossible_placement_on_a_local_ray_fails_at_once(local_ray: None) -> None:
    from training.ppo_batch import RoleError
    from training.ray_roles import RoleGroup

    cfg = PPOConfig(prompts="p", model="m", out="o", reward="rule:format", actor_workers=2,
                    cpus_per_worker=1.0)  # 5 Ray actors x 1 CPU on a 2-CPU local Ray
    group = RoleGroup(cfg)
    with pytest.raises(RoleError, match=r"5 Ray actors x 1.0 CPU exceed the local Ray's 2 CPU"):
        group.start()
    assert group.handles == []
