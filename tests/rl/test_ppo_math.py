"""PPO's own pieces without Ray: the compositions in training/rl_losses.py, the batch layout and
forwards of training/ppo_batch.py, the roles of training/ppo_roles.py, the placement of
training/ray_roles.py, the config, against closed forms and reference code paths."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from training.optim import lr_factor
from training.ppo import prompt_batch, resolve_ppo_config
from training.ppo_batch import (
    StepLedger,
    StepOrderError,
    collate_rollouts,
    last_token_scores,
    minibatch_order,
    pad_right,
    policy_logps,
    token_values,
)
from training.ppo_config import PPOConfig, PPOConfigError, load_ppo_config
from training.ray_roles import hosts_for
from training.rl_losses import (
    RunningMoments,
    combine_moments,
    gae,
    kl_penalty,
    masked_whiten,
    normalise_scores,
    ptx_combined_loss,
    shard_advantages,
    shard_moments,
)

BASE = ["prompts=p.jsonl", "model=m", "out=o", "reward=rule:format"]


def _cfg(*overrides: str) -> PPOConfig:
    return load_ppo_config(None, [*BASE, *overrides])


def _estimators(cfg: PPOConfig) -> dict[str, Any]:
    """The config fields rl_losses.shard_advantages takes as plain arguments."""
    return {"kl_estimator": cfg.kl_estimator, "advantage_estimator": cfg.advantage_estimator,
            "gamma": cfg.gamma, "lam": cfg.lam}


def _ragged_mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths])


# ------------------------------------------------------------------------------ schedules


def test_lr_is_linear_warmup_then_cosine_to_the_floor() -> None:
    kw: dict[str, Any] = {"warmup_steps": 4, "total_steps": 14, "schedule": "cosine",
                          "min_lr_ratio": 0.1}
    assert [lr_factor(s, **kw) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert lr_factor(4, **kw) == pytest.approx(1.0)
    assert lr_factor(9, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: cos(pi/2) = 0
    assert lr_factor(14, **kw) == pytest.approx(0.1)
    assert lr_factor(40, **kw) == pytest.approx(0.1)  # never below the floor
    assert lr_factor(9, **{**kw, "schedule": "constant"}) == 1.0


def test_minibatch_order_is_a_seeded_permutation() -> None:
    first = minibatch_order(8, seed=0, step=3, epoch=1)
    assert sorted(first) == list(range(8))
    assert first == minibatch_order(8, seed=0, step=3, epoch=1)
    assert first != minibatch_order(8, seed=0, step=4, epoch=1)


def test_prompt_batches_cover_every_prompt_once_per_epoch_and_replay_identically() -> None:
    seen = [i for step in range(5) for i in prompt_batch(step, 10, 4, seed=3)]
    assert sorted(seen[:10]) == list(range(10))  # epoch 0, across the step boundary
    assert prompt_batch(2, 10, 4, seed=3) == prompt_batch(2, 10, 4, seed=3)
    assert len(prompt_batch(0, 3, 7, seed=0)) == 7  # batch larger than the file wraps epochs


# ------------------------------------------------------------------------------ rewards, advantages


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_shard_advantages_put_the_score_on_the_last_token_and_the_kl_everywhere(
        estimator: str) -> None:
    torch.manual_seed(0)
    mask = _ragged_mask([3, 1, 4], 4)
    old, ref, values = torch.randn(3, 4) * mask, torch.randn(3, 4) * mask, torch.randn(3, 4)
    scores = torch.tensor([1.0, -2.0, 0.5])
    cfg = _cfg(f"kl_estimator={estimator}", "gamma=0.9", "lam=0.8")
    out = shard_advantages(old_logp=old, ref_logp=ref, values=values, scores=scores,
                           mask=mask, kl_coef=0.1, **_estimators(cfg))
    assert torch.equal(out["kl"], kl_penalty(old, ref, estimator) * mask)
    # by hand: r_t = -0.1 kl_t, plus the score on the last completion token only
    expected = -0.1 * out["kl"]
    for row, last in enumerate([2, 0, 3]):
        expected[row, last] += scores[row]
    assert torch.allclose(out["rewards"], expected)
    adv, ret = gae(expected, values, mask, 0.9, 0.8)
    assert torch.allclose(out["advantages"], adv) and torch.allclose(out["returns"], ret)


def test_reinforce_advantages_are_discounted_returns_to_go_without_a_baseline() -> None:
    mask = _ragged_mask([3], 3)
    cfg = _cfg("advantage_estimator=reinforce", "gamma=0.5", "kl_coef=0.0")
    out = shard_advantages(old_logp=torch.zeros(1, 3), ref_logp=torch.zeros(1, 3),
                           values=torch.full((1, 3), 9.0), scores=torch.tensor([4.0]),
                           mask=mask, kl_coef=0.0, **_estimators(cfg))
    # the only reward is 4 at t=2: G_t = 0.5^(2-t) * 4, whatever the critic says
    assert out["advantages"].tolist() == [[1.0, 2.0, 4.0]]
    assert torch.equal(out["returns"], out["advantages"])


def test_whitening_two_shards_with_combined_moments_equals_whitening_one_batch() -> None:
    """What the loop does with N actor workers: each shard sends (count, sum, sumsq) of its raw
    advantages, the driver combines them, each shard whitens with the global statistics."""
    torch.manual_seed(1)
    cfg = _cfg()
    mask = _ragged_mask([5, 2, 7, 1, 3, 6], 7)
    old, ref = torch.randn(6, 7) * mask, torch.randn(6, 7) * mask
    values, scores = torch.randn(6, 7), torch.randn(6) * 3 + 1

    def whitened(split: list[int]) -> torch.Tensor:
        parts = []
        for rows in (list(range(sum(split[:i]), sum(split[:i + 1]))) for i in range(len(split))):
            parts.append((shard_advantages(old_logp=old[rows], ref_logp=ref[rows],
                                           values=values[rows], scores=scores[rows],
                                           mask=mask[rows], kl_coef=0.05,
                                           **_estimators(cfg))["advantages"],
                          mask[rows]))
        stats = combine_moments([shard_moments(a, m) for a, m in parts])
        return torch.cat([masked_whiten(a, m, stats=stats) for a, m in parts])

    one, two = whitened([6]), whitened([2, 4])
    assert torch.allclose(one, two, atol=1e-6)
    flat = one[mask.bool()]
    assert float(flat.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(flat.var(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    # whitening each shard on its own would give a different answer
    own = torch.cat([masked_whiten(a, m) for a, m in [(one[:2], mask[:2]), (one[2:], mask[2:])]])
    assert not torch.allclose(own, one, atol=1e-3)


def test_reward_normalisation_uses_running_moments_and_clips() -> None:
    moments = RunningMoments()
    cfg = _cfg("reward_clip=1.0")
    out = normalise_scores(torch.tensor([0.0, 10.0]), moments, normalize=cfg.normalize_reward,
                           clip=cfg.reward_clip)
    assert moments.mean == 5.0 and moments.var == 25.0
    assert out.tolist() == [-1.0, 1.0]
    plain = _cfg("normalize_reward=false")
    raw = normalise_scores(torch.tensor([0.0, 10.0]), RunningMoments(),
                           normalize=plain.normalize_reward, clip=plain.reward_clip)
    assert raw.tolist() == [0.0, 10.0]


def test_ptx_term_fixed_and_relative_to_the_policy_loss() -> None:
    pg, sft = torch.tensor(-0.2, requires_grad=True), torch.tensor(2.0, requires_grad=True)
    assert float(ptx_combined_loss(pg, sft, 0.5, "fixed").detach()) == pytest.approx(-0.2 + 1.0)
    loss = ptx_combined_loss(pg, sft, 0.5, "relative")
    # the SFT term is 0.5 * |pg| in size, and its gradient is scaled by 0.5 * |pg| / sft
    assert float(loss.detach()) == pytest.approx(-0.2 + 0.5 * 0.2)
    loss.backward()
    assert sft.grad is not None and float(sft.grad) == pytest.approx(0.5 * 0.2 / 2.0)
    assert pg.grad is not None and float(pg.grad) == pytest.approx(1.0)  # ratio is detached


# ------------------------------------------------------------------------------ step ids


def test_step_ledger_applies_in_order_repeats_idempotently_and_refuses_gaps() -> None:
    ledger = StepLedger()
    assert ledger.check(1) is None
    ledger.record(1, {"loss": 0.5})
    assert ledger.check(1) == {"loss": 0.5}  # a repeated delivery: same answer, no new update
    assert ledger.check(2) is None
    with pytest.raises(StepOrderError, match="step 3 arrived after step 1"):
        ledger.check(3)
    with pytest.raises(StepOrderError):
        StepLedger().check(2)  # a restarted role (state lost) refuses step 2


@pytest.mark.parametrize(("workers", "actor_ref", "critic_reward", "expected"), [
    (1, False, False, 4), (1, True, False, 3), (1, False, True, 3), (1, True, True, 2),
    (2, False, False, 5), (2, True, True, 3)])
def test_colocation_decides_how_many_ray_actors_exist(
        workers: int, actor_ref: bool, critic_reward: bool, expected: int) -> None:
    hosts = hosts_for(workers, actor_ref, critic_reward)
    assert len(hosts) == expected
    roles = [r for h in hosts for r in h]
    assert roles.count("actor") == workers and roles.count("critic") == 1
    assert roles.count("ref") == (workers if actor_ref else 1)


# ------------------------------------------------------------------------------ forwards


@pytest.fixture(scope="module")
def tiny_lm(rl_tokenizer: Any) -> Any:
    from training.models import build_tiny_causal_lm

    return build_tiny_causal_lm(rl_tokenizer, seed=0).eval()


@pytest.fixture(scope="module")
def tiny_scalar(tiny_policy_dir: Path, rl_tokenizer: Any) -> Any:
    from training.models import load_reward_backbone

    torch.manual_seed(5)
    return load_reward_backbone(str(tiny_policy_dir), rl_tokenizer.pad_token_id).eval()


PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
COMPLETIONS = [[20, 21], [22, 23, 24, 25], [26]]


def test_left_padded_policy_logps_equal_the_unpadded_forward(tiny_lm: Any) -> None:
    from training.logprobs import completion_logps

    batch = collate_rollouts(PROMPTS, COMPLETIONS, pad_id=0)
    assert batch.completion_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    with torch.no_grad():
        padded = policy_logps(tiny_lm, batch, temperature=1.0)
        hot = policy_logps(tiny_lm, batch, temperature=2.0)
        for row, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS, strict=True)):
            ids = torch.tensor([p + c])
            ref = completion_logps(tiny_lm, ids, torch.ones_like(ids),
                                   torch.tensor([[0] * len(p) + [1] * len(c)]))
            assert torch.allclose(padded[row, :len(c)], ref.per_token[0, -len(c):], atol=1e-5)
            # temperature: log_softmax(logits / T) of the same tokens
            logits = tiny_lm(input_ids=ids).logits[0, len(p) - 1:-1] / 2.0
            expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None])[:, 0]
            assert torch.allclose(hot[row, :len(c)], expected, atol=1e-5)
    assert float(padded[0, 2:].abs().sum()) == 0.0  # nothing off the mask


def test_values_and_scores_read_the_right_positions(tiny_scalar: Any) -> None:
    from training.logprobs import sequence_rewards

    batch = collate_rollouts(PROMPTS, COMPLETIONS, pad_id=0)
    with torch.no_grad():
        values = token_values(tiny_scalar, batch)
        scores = last_token_scores(tiny_scalar, batch)
        for row, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS, strict=True)):
            ids = torch.tensor([p + c])
            hidden = tiny_scalar.model(input_ids=ids)[0]
            per_position = tiny_scalar.score(hidden)[0, :, 0]
            # V(s_t) is read where y_t is predicted: positions len(p)-1 .. len(p)+len(c)-2
            assert torch.allclose(values[row, :len(c)], per_position[len(p) - 1:-1], atol=1e-5)
            reference = sequence_rewards(tiny_scalar, ids, torch.ones_like(ids))
            assert float(scores[row]) == pytest.approx(float(reference[0]), abs=1e-5)


def test_pad_right_aligns_completion_columns() -> None:
    out = pad_right([torch.ones(1, 2), torch.full((2, 3), 2.0)])
    assert out.tolist() == [[1, 1, 0], [2, 2, 2], [2, 2, 2]]


# ------------------------------------------------------------------------------ roles in-process


def _role_cfg(tmp_path: Path, **extra: Any) -> PPOConfig:
    return PPOConfig(**{"prompts": "p.jsonl", "out": str(tmp_path / "run"), "lora": "off",
                        "device": "cpu", **extra})


@pytest.fixture(scope="module")
def tiny_rm_dir(tmp_path_factory: pytest.TempPathFactory, tiny_policy_dir: Path,
                rl_tokenizer: Any) -> Path:
    from training.models import load_reward_backbone

    torch.manual_seed(11)
    model = load_reward_backbone(str(tiny_policy_dir), rl_tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("tiny-rm")
    model.save_pretrained(folder)
    rl_tokenizer.save_pretrained(folder)
    return folder


def test_critic_starts_from_the_reward_model(tmp_path: Path, tiny_policy_dir: Path,
                                             tiny_rm_dir: Path) -> None:
    from training.models import load_reward_backbone
    from training.ppo_batch import collate_rollouts
    from training.ppo_roles import CriticRole

    cfg = _role_cfg(tmp_path, model=str(tiny_policy_dir), reward_model=str(tiny_rm_dir))
    assert cfg.critic_source == str(tiny_rm_dir)
    critic = CriticRole(cfg)
    rm = load_reward_backbone(str(tiny_rm_dir), 0)
    assert torch.equal(critic.model.score.weight, rm.score.weight)
    batch = collate_rollouts(PROMPTS, COMPLETIONS, critic.pad_id)
    with torch.no_grad():  # V at the last completion position is what the RM says there
        values = token_values(rm, batch)
    from training.ppo_batch import RolloutShard

    shard = RolloutShard(["x"] * 3, [None] * 3, PROMPTS, COMPLETIONS, ["", "", ""], ["stop"] * 3,
                         [0, 1, 2])
    assert torch.allclose(critic.values(shard), values, atol=1e-6)
    # without a reward model the critic is the policy's backbone with a fresh head
    policy_critic = _role_cfg(tmp_path, model=str(tiny_policy_dir), reward="rule:format")
    assert policy_critic.critic_source == str(tiny_policy_dir)


def test_reward_model_scores_at_an_end_of_text_token(tmp_path: Path, tiny_policy_dir: Path,
                                                     tiny_rm_dir: Path, rl_tokenizer: Any) -> None:
    from training.ppo_batch import RolloutShard, last_token_scores
    from training.ppo_roles import RewardRole

    eos = rl_tokenizer.eos_token_id
    chat = [{"role": "user", "content": "z"}]
    shard = RolloutShard(["x", "y", chat], [None] * 3, [[5, 6], [7], [8]],
                         [[20, 21], [22, eos], [23, eos]], [""] * 3,
                         ["length", "stop", "stop"], [0, 1, 2])
    on_eos = RewardRole(_role_cfg(tmp_path, model=str(tiny_policy_dir),
                                  reward_model=str(tiny_rm_dir)))
    as_is = RewardRole(_role_cfg(tmp_path, model=str(tiny_policy_dir),
                                 reward_model=str(tiny_rm_dir), reward_on_eos=False))
    assert on_eos.model is not None  # same tokenizer: scored on token ids
    with torch.no_grad():
        # a chat turn is closed as the chat template closes it in RM training (EOS, newline)
        assert on_eos.turn_suffix == rl_tokenizer("\n", add_special_tokens=False)["input_ids"]
        appended = last_token_scores(on_eos.model, collate_rollouts(
            [[5, 6], [7], [8]], [[20, 21, eos], [22, eos], [23, eos, *on_eos.turn_suffix]],
            on_eos.pad_id))
        raw = last_token_scores(on_eos.model, collate_rollouts(
            [[5, 6], [7], [8]], [[20, 21], [22, eos], [23, eos]], on_eos.pad_id))
    assert torch.allclose(on_eos.score(shard), appended, atol=1e-6)
    assert torch.allclose(as_is.score(shard), raw, atol=1e-6)
    assert float(appended[0]) != pytest.approx(float(raw[0]))  # the truncated one differs
    assert float(appended[1]) == pytest.approx(float(raw[1]))  # the finished one does not


# ------------------------------------------------------------------------------ config, inputs


def test_config_layers_and_flags(tmp_path: Path) -> None:
    toml = tmp_path / "my.toml"
    toml.write_text("steps = 7\nkl_coef = 0.2\n")
    cfg = resolve_ppo_config(prompts="p.jsonl", model="m", reward_model="rm", out="o",
                             config_path=str(toml), overrides=["kl_coef=0.3"],
                             colocate=["actor,ref", "reward,critic"])
    assert (cfg.steps, cfg.kl_coef, cfg.reward_spec) == (7, 0.3, "rm:rm")
    assert cfg.colocate_actor_ref and cfg.colocate_critic_reward
    assert cfg.critic_source == "rm"
    cfg.save(tmp_path / "config.json")
    from training.ppo_config import ppo_config_from_dict

    assert ppo_config_from_dict(json.loads((tmp_path / "config.json").read_text())) == cfg


@pytest.mark.parametrize(("overrides", "message"), [
    (["nope=1"], "unknown config key 'nope'"),
    (["steps=two"], "steps must be an integer"),
    (["kl_estimator=k9"], "kl_estimator must be one of"),
    (["reward_model=rm"], "exactly one reward source"),
    (["freeze_actor_steps=20"], "leaves no actor update"),
    (["mini_batch_size=3"], "mini_batch_size=3 must divide"),
    (["actor_workers=3"], "divide evenly among actor_workers=3"),
    (["ptx_data=sft.jsonl"], "PPO-ptx needs both"),
    (["gamma=1.5"], "gamma and lam"),
])
def test_bad_config_is_refused_with_a_clear_message(overrides: list[str], message: str) -> None:
    with pytest.raises(PPOConfigError, match=message.replace("(", r"\(")):
        _cfg(*overrides)


def test_bad_colocation_is_refused() -> None:
    with pytest.raises(PPOConfigError, match="choose actor,ref or critic,reward"):
        resolve_ppo_config(prompts="p", model="m", reward_model="rm", out="o",
                           colocate=["actor,critic"])


def test_bad_reward_spec_and_prompts_are_refused_before_ray(tmp_path: Path,
                                                           tiny_policy_dir: Path) -> None:
    from training.online_data import OnlineDataError
    from training.ppo import run_ppo
    from training.rewards import RewardSpecError

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    model = str(tiny_policy_dir)
    with pytest.raises(RewardSpecError, match="unknown rule check"):
        run_ppo(prompts=str(prompts), model=model, reward_model=None, out=str(tmp_path / "o"),
                overrides=["reward=rule:nonsense"])
    with pytest.raises(RewardSpecError, match="no model folder"):
        run_ppo(prompts=str(prompts), model=model, reward_model=None, out=str(tmp_path / "o"),
                overrides=[f"reward=rm:{tmp_path}*0.5,rule:format*0.5"])
    with pytest.raises(OnlineDataError, match=r"p.jsonl:2: 'prompt' must be"):
        run_ppo(prompts=str(prompts), model=model, reward_model=None, out=str(tmp_path / "o"),
                overrides=["reward=rule:format"])
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_reward_role_takes_rule_and_composed_specs(tmp_path: Path, tiny_policy_dir: Path,
                                                   tiny_rm_dir: Path) -> None:
    from training.ppo_batch import RolloutShard
    from training.ppo_roles import RewardRole
    from training.rewards import make_reward

    texts = ["It is 4. <answer>4</answer>", "no tag here"]
    shard = RolloutShard(["What is 2+2?", "What is 1+1?"], ["4", "2"], [[5], [6]], [[7], [8]],
                         texts, ["stop", "stop"], [0, 1])
    rule = RewardRole(_role_cfg(tmp_path, model=str(tiny_policy_dir),
                                reward="rule:format+accuracy"))
    assert rule.score(shard).tolist() == [1.0, 0.0]
    spec = f"rm:{tiny_rm_dir}*0.5,rule:format*2"
    mixed = RewardRole(_role_cfg(tmp_path, model=str(tiny_policy_dir), reward=spec))
    expected = make_reward(spec)(shard.prompts, texts, shard.answers)
    assert mixed.score(shard).tolist() == pytest.approx(expected, abs=1e-6)
