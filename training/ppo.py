"""RM + PPO (the InstructGPT recipe) with OpenRLHF's four roles on Ray: `prefloop train ppo`.

Ouyang et al. 2022 (arXiv:2203.02155), Sec. 3.5: maximise E[r(x, y)] - beta KL(pi || pi_ref)
with PPO (Schulman et al. 2017), plus an optional pretraining (SFT) term (PPO-ptx). Each
iteration reads like a recipe (cf. verl's `fit()`):

    generate (actor workers) -> ref log-probs, values, scores (reference, critic, reward; in
    parallel) -> normalise scores -> token rewards with the KL penalty -> GAE per shard ->
    whiten with global moments -> update critic and actor (in parallel) -> KL controller

The math is the pure functions of training.rl_losses; the roles are training/ppo_roles.py, their
batch layout training/ppo_batch.py and their placement on Ray training/ray_roles.py.

    prefloop train ppo --prompts prompts.jsonl --model smollm2-135m-instruct \
        --reward-model runs/rm/model --colocate actor,ref --colocate critic,reward \
        --out runs/ppo1 --set steps=50
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.online_data import OnlineResult, read_prompts
from training.ppo_batch import RoleError, pad_right, resolve_model_folder
from training.ppo_config import PPOConfig, PPOConfigError, load_ppo_config
from training.run_files import append_jsonl, changed_config_keys, git_sha, truncate_jsonl

if TYPE_CHECKING:
    import torch

    from training.ray_roles import RoleGroup

log = logging.getLogger("prefloop.training.ppo")
PhaseHook = Callable[[int, str, "RoleGroup"], None]
"""hook(step, phase, roles), phase in: rollout, scored, update, done (tests inject faults)."""


class PPOError(RuntimeError):
    """A PPO run that cannot continue (a role died, bad input found late, resume mismatch)."""


# ------------------------------------------------------------------------------ prompts


def prompt_batch(step: int, num_prompts: int, batch: int, seed: int) -> list[int]:
    """Prompt indices of PPO iteration `step` (0-based): a seeded permutation per epoch, so a
    replayed or resumed step sees the same prompts."""
    import torch

    out: list[int] = []
    position = step * batch
    while len(out) < batch:
        epoch, offset = divmod(position, num_prompts)
        order = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed + epoch))
        take = min(batch - len(out), num_prompts - offset)
        out += order[offset:offset + take].tolist()
        position += take
    return out


# ------------------------------------------------------------------------------ the loop


def _is_role_failure(exc: BaseException) -> bool:
    """A dead Ray actor, or a role that lost its state (restarted) and refused the call."""
    from ray.exceptions import RayActorError, RayTaskError

    if isinstance(exc, RayActorError):
        return True
    if isinstance(exc, RoleError) and not isinstance(exc, RayTaskError):
        return True  # raised in the driver (e.g. a restarted role found at checkpoint time)
    if isinstance(exc, RayTaskError):
        cause = exc.cause if hasattr(exc, "cause") else None
        return isinstance(cause, RayActorError | RoleError)
    return False


class PPOTrainer:
    """Drives one PPO run; the roles do the compute. Not reusable after `run()`."""

    def __init__(self, cfg: PPOConfig, *, ray_address: str | None = None,
                 on_phase: PhaseHook | None = None):
        self.cfg, self.ray_address, self.on_phase = cfg, ray_address, on_phase
        self.run_dir = Path(cfg.out)
        self.prompts = read_prompts(cfg.prompts)  # OnlineDataError (file:line) before Ray starts

    # --- state that lives in the driver ---------------------------------------------------
    def _fresh_driver_state(self) -> None:
        from training.rl_losses import AdaptiveKLController, FixedKLController, RunningMoments

        cfg = self.cfg
        self.kl_ctl: Any = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
                            if cfg.kl_controller == "adaptive" else FixedKLController(cfg.kl_coef))
        self.reward_moments = RunningMoments()

    def _driver_state(self) -> dict[str, Any]:
        m = self.reward_moments
        return {"kl_coef": self.kl_ctl.value,
                "reward_moments": {"count": m.count, "mean": m.mean, "var": m.var}}

    def _load_driver_state(self, state: dict[str, Any]) -> None:
        self._fresh_driver_state()
        self.kl_ctl.value = float(state["kl_coef"])
        for key, value in state["reward_moments"].items():
            setattr(self.reward_moments, key, float(value))

    # --- checkpoints ------------------------------------------------------------------------
    def _save(self, step: int) -> None:
        import ray

        from training import checkpoint as ckpt

        roles = self.roles
        actor_state, critic_state = ray.get([
            roles.actors[0].call.remote("actor", "state"),
            roles.critic.call.remote("critic", "state")])
        # A role that Ray restarted behind our back has a fresh state: never checkpoint that.
        for name, role_state in (("actor", actor_state), ("critic", critic_state)):
            if int(role_state["applied_step"]) != step:
                raise RoleError(f"the {name} has applied step {role_state['applied_step']}, not "
                                f"{step}: it lost its state (restarted?)")
        state = {"step": step, "actor": actor_state, "critic": critic_state,
                 "driver": self._driver_state()}

        def save_model(folder: Path) -> None:
            ray.get(roles.actors[0].call.remote("actor", "save_checkpoint_model", str(folder)))

        ckpt.save_checkpoint(self.run_dir, step, save_model, state, keep=self.cfg.keep_checkpoints)

    def _restore(self, checkpoint: Path) -> int:
        import ray

        from training import checkpoint as ckpt

        state = ckpt.load_state(checkpoint)
        roles = self.roles
        ray.get([h.call.remote("actor", "load_state", state["actor"]) for h in roles.actors]
                + [roles.critic.call.remote("critic", "load_state", state["critic"])])
        self._load_driver_state(state["driver"])
        step = int(state["step"])
        truncate_jsonl(self.run_dir / "metrics.jsonl", step)
        truncate_jsonl(self.run_dir / "samples.jsonl", step)
        return step

    def _prepare_run_dir(self) -> Path | None:
        from training import checkpoint as ckpt

        run_dir = self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        latest = ckpt.latest_checkpoint(run_dir)
        if not self.cfg.resume:
            if latest is not None or (run_dir / "model").exists():
                raise PPOConfigError(f"{run_dir} already holds a run; pass --set resume=true "
                                     "to continue it or choose another --out")
            for stale in ("metrics.jsonl", "samples.jsonl"):
                (run_dir / stale).unlink(missing_ok=True)
            return None
        changed = changed_config_keys(run_dir / "config.json", self.cfg.to_dict(), {
            "resume", "progress", "save_steps", "keep_checkpoints", "log_rollouts",
            "max_step_retries"})
        if changed:
            raise PPOConfigError(f"cannot resume {run_dir}: config changed in {changed}")
        if latest is None:  # nothing to resume from: start over, without stale records
            for stale in ("metrics.jsonl", "samples.jsonl"):
                truncate_jsonl(run_dir / stale, 0)
        return latest

    # --- one iteration ----------------------------------------------------------------------
    def _hook(self, step: int, phase: str) -> None:
        if self.on_phase is not None:
            self.on_phase(step, phase, self.roles)

    def _step(self, step: int) -> dict[str, Any]:
        """PPO iteration `step` (1-based). Raises on any role failure; applies nothing twice."""
        import ray
        import torch

        from training.rl_losses import combine_moments, masked_mean, normalise_scores

        cfg, roles = self.cfg, self.roles
        started = time.perf_counter()
        indices = prompt_batch(step - 1, len(self.prompts), cfg.rollout_batch_size, cfg.seed)
        per_worker = cfg.rollout_batch_size // cfg.actor_workers
        shard_refs = []
        for rank, handle in enumerate(roles.actors):
            mine = indices[rank * per_worker:(rank + 1) * per_worker]
            seed = (cfg.seed * 1_000_003 + step) * 101 + rank
            shard_refs.append(handle.call.remote(
                "actor", "rollout", step, [self.prompts[i].prompt for i in mine],
                [self.prompts[i].answer for i in mine], mine, seed))
        ray.wait(shard_refs, num_returns=len(shard_refs), timeout=None)
        timing = {"time/generate_s": time.perf_counter() - started}
        self._hook(step, "rollout")
        # Reference, critic and reward score every shard concurrently.
        ref_refs = [roles.ref_for(i).call.remote("ref", "logps", s)
                    for i, s in enumerate(shard_refs)]
        value_refs = [roles.critic.call.remote("critic", "values", s) for s in shard_refs]
        raw_scores = ray.get([roles.reward.call.remote("reward", "score", s)
                              for s in shard_refs])
        ray.wait(ref_refs + value_refs, num_returns=len(ref_refs) + len(value_refs), timeout=None)
        timing["time/score_s"] = time.perf_counter() - started - timing["time/generate_s"]
        self._hook(step, "scored")
        sizes = [len(s) for s in raw_scores]
        scores = normalise_scores(torch.cat(raw_scores), self.reward_moments,
                                  normalize=cfg.normalize_reward, clip=cfg.reward_clip)
        kl_coef = float(self.kl_ctl.value)
        moments = ray.get([
            handle.call.remote("actor", "make_advantages", step, ref_refs[i], value_refs[i],
                               part, kl_coef)
            for i, (handle, part) in enumerate(zip(roles.actors, scores.split(sizes),
                                                   strict=True))])
        # Whitening uses the moments of the whole batch, combined across actor workers.
        stats = combine_moments(moments) if cfg.whiten_advantages else None
        experience = ray.get([h.call.remote("actor", "whiten", step, stats)
                              for h in roles.actors])
        shards = ray.get(shard_refs)
        frozen = step <= cfg.freeze_actor_steps
        update_started = time.perf_counter()
        self._hook(step, "update")
        critic_ref = roles.critic.call.remote("critic", "train", step, shards, experience)
        actor_refs = [h.call.remote("actor", "train", step, frozen) for h in roles.actors]
        critic_stats = ray.get(critic_ref)
        actor_stats = ray.get(actor_refs)[0]
        timing["time/update_s"] = time.perf_counter() - update_started

        # KL of the batch, as logged: token mean and per-sequence sum of the estimator.
        mask = _cat([e["mask"] for e in experience])
        kl = _cat([e["kl"] for e in experience])
        kl_token = float(masked_mean(kl, mask))
        kl_sequence = float((kl * mask).sum(-1).mean())
        self.kl_ctl.update(kl_sequence, cfg.batch_sequences)
        lengths = mask.sum(-1)
        record: dict[str, Any] = {
            "step": step,
            "ppo/kl": kl_token,
            "ppo/kl_sequence": kl_sequence,
            "ppo/kl_coef": kl_coef,
            "ppo/score": float(torch.cat(raw_scores).mean()),
            "ppo/score_normalised": float(scores.mean()),
            "ppo/return": float(masked_mean(_cat([e["returns"] for e in experience]), mask)),
            "ppo/advantage_std": float(_cat([e["advantages"] for e in experience])[
                mask.bool()].std()),
            "ppo/response_length": float(lengths.mean()),
            "ppo/truncated_fraction": float(sum(r == "length" for s in shards
                                                for r in s.finish_reasons) / len(lengths)),
            "ppo/step_time_s": time.perf_counter() - started,
            **timing, **actor_stats, **critic_stats,
        }
        if cfg.log_rollouts:
            self._log_rollouts(step, shards, experience, raw_scores, scores)
        self._hook(step, "done")
        return record

    def _log_rollouts(self, step: int, shards: list[Any], experience: list[dict[str, Any]],
                      raw_scores: list[torch.Tensor], scores: torch.Tensor) -> None:
        import torch

        folder = self.run_dir / "rollouts"
        folder.mkdir(exist_ok=True)
        tensors = {key: _cat([e[key] for e in experience]) for key in experience[0]}
        tensors |= {"scores": torch.cat(raw_scores), "scores_normalised": scores,
                    "shard_sizes": torch.tensor([len(s) for s in shards])}
        torch.save(tensors, folder / f"step-{step:08d}.pt")
        with (self.run_dir / "samples.jsonl").open("a") as handle:
            flat = torch.cat(raw_scores).tolist()
            rows = [(s.prompt_index[i], s.texts[i], s.finish_reasons[i])
                    for s in shards for i in range(len(s))]
            for (index, text, reason), score in zip(rows, flat, strict=True):
                handle.write(json.dumps({"step": step, "prompt_index": index, "text": text,
                                         "score": score, "finish_reason": reason}) + "\n")

    # --- the run ----------------------------------------------------------------------------
    def run(self) -> OnlineResult:
        import ray
        from tqdm.auto import tqdm

        from training import checkpoint as ckpt
        from training.ray_roles import RoleGroup
        from training.raycluster import ensure_ray

        cfg = self.cfg
        if self.ray_address:  # joined (or refused, RayConnectError) before anything is written
            ensure_ray(self.ray_address)
        resume_from = self._prepare_run_dir()
        cfg.save(self.run_dir / "config.json")
        ensure_ray(self.ray_address)
        self.roles = RoleGroup(cfg, local=self.ray_address is None)
        self._fresh_driver_state()
        run_info: dict[str, Any] = {
            "algo": "ppo", "prompts": cfg.prompts, "num_prompts": len(self.prompts),
            "ray_address": self.ray_address, "ray_actors": len(self.roles.layout),
            "layout": [list(r) for r in self.roles.layout], "python": platform.python_version(),
            "git_sha": git_sha(), "pid": os.getpid(),
        }
        self.roles.start()
        try:
            step = self._restore(resume_from) if resume_from is not None else 0
            if cfg.max_step_retries and ckpt.latest_checkpoint(self.run_dir) is None:
                self._save(0)  # replay needs a starting point
            metrics_path = self.run_dir / "metrics.jsonl"
            retries = 0
            last: dict[str, Any] = {}
            bar = tqdm(total=cfg.steps, initial=step, desc="ppo", unit="step",
                       disable=not cfg.progress)
            while step < cfg.steps:
                try:
                    record = self._step(step + 1)
                    append_jsonl(metrics_path, [record])
                    if cfg.save_steps and (step + 1) % cfg.save_steps == 0:
                        self._save(step + 1)
                except Exception as exc:
                    if not _is_role_failure(exc):
                        raise
                    latest = ckpt.latest_checkpoint(self.run_dir)
                    where = f"last complete checkpoint: {latest}" if latest else "no checkpoint"
                    if retries >= cfg.max_step_retries:
                        raise PPOError(
                            f"a PPO role failed during step {step + 1} ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:300]}); no update of that step was "
                            f"kept. {where}; rerun with --set resume=true to continue") from exc
                    retries += 1
                    log.warning("role failure in step %d (%s); restoring %s and replaying "
                                "(retry %d of %d)", step + 1, type(exc).__name__, latest,
                                retries, cfg.max_step_retries)
                    self.roles.revive()
                    assert latest is not None  # a step-0 checkpoint exists when retries are on
                    step = self._restore(latest)
                    bar.n = step
                    bar.refresh()
                    continue
                step += 1
                last = record
                bar.update(1)
                bar.set_postfix(score=f"{record['ppo/score']:.3f}", kl=f"{record['ppo/kl']:.4f}")
            bar.close()
            latest = ckpt.latest_checkpoint(self.run_dir)
            if latest is None or latest.name != f"step-{step:08d}":
                self._save(step)
            optimizer_steps = ray.get(self.roles.actors[0].call.remote("actor",
                                                                       "optimizer_steps"))
            expected = (cfg.steps - cfg.freeze_actor_steps) * cfg.updates_per_step
            if step != cfg.steps or optimizer_steps != expected:  # never a silent short run
                raise PPOError(f"ran {step} iterations and {optimizer_steps} actor optimizer "
                               f"steps, expected {cfg.steps} and {expected}")
            final_dir, tmp_dir = self.run_dir / "model", self.run_dir / ".tmp-model"
            shutil.rmtree(tmp_dir, ignore_errors=True)
            ray.get(self.roles.actors[0].call.remote("actor", "save_full_model", str(tmp_dir)))
            shutil.rmtree(final_dir, ignore_errors=True)
            os.replace(tmp_dir, final_dir)
        finally:
            self.roles.stop()
        metrics = {k: float(v) for k, v in last.items() if isinstance(v, int | float)}
        run_info |= {"steps_done": step, "retries": retries, "final_metrics": metrics,
                     "actor_optimizer_steps": optimizer_steps}
        (self.run_dir / "run.json").write_text(json.dumps(run_info, indent=2, default=str) + "\n")
        return OnlineResult(run_dir=self.run_dir, model_dir=final_dir, steps=step,
                            metrics=metrics)


def _cat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return pad_right(list(tensors))


def resolve_ppo_config(*, prompts: str, model: str, reward_model: str | None, out: str,
                       critic_init: str | None = None, config_path: str | None = None,
                       overrides: Sequence[str] = (), colocate: Sequence[str] = ()) -> PPOConfig:
    """The config of a run: the file, then --set, then the flags (flags win)."""
    items = [*overrides, f"prompts={prompts}", f"model={model}", f"out={out}"]
    if reward_model:
        items.append(f"reward_model={reward_model}")
    if critic_init:
        items.append(f"critic_init={critic_init}")
    for group in colocate:
        roles = frozenset(r.strip() for r in group.split(","))
        if roles == {"actor", "ref"}:
            items.append("colocate_actor_ref=true")
        elif roles == {"critic", "reward"}:
            items.append("colocate_critic_reward=true")
        else:
            raise PPOConfigError(f"--colocate {group!r}: choose actor,ref or critic,reward")
    return load_ppo_config(config_path, items)


def run_ppo(*, prompts: str, model: str, reward_model: str | None, out: str,
            critic_init: str | None = None, config_path: str | None = None,
            overrides: Sequence[str] = (), colocate: Sequence[str] = (),
            ray_address: str | None = None, on_phase: PhaseHook | None = None) -> OnlineResult:
    """Run RM + PPO and return the run (model_dir is a FULL Hugging Face folder).

    Raises:
        PPOConfigError, OnlineDataError, RewardSpecError, ModelNotFoundError: bad config, prompts,
            reward spec or model (all before Ray starts).
        PPOError: a run that cannot continue (a role died and no retry is left, ...).
        RayConnectError: the cluster at ray_address cannot be joined (before anything is
            written).
    """
    cfg = resolve_ppo_config(prompts=prompts, model=model, reward_model=reward_model, out=out,
                             critic_init=critic_init, config_path=config_path,
                             overrides=overrides, colocate=colocate)
    from training.rewards import parse_reward_spec, reward_model_folder

    # Input errors are found here, before Ray starts or a model loads.
    for path in {cfg.model, cfg.critic_source, cfg.reward_model} - {""}:
        resolve_model_folder(path)
    if cfg.reward:
        for kind, argument, _ in parse_reward_spec(cfg.reward):
            if kind == "rm":
                reward_model_folder(argument)
            else:
                from training.rewards import rule_reward

                rule_reward(argument)
    return PPOTrainer(cfg, ray_address=ray_address, on_phase=on_phase).run()


__all__ = ["PPOError", "PPOTrainer", "PhaseHook", "prompt_batch", "resolve_ppo_config",
           "run_ppo"]
