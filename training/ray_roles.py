"""How Ray places the four PPO roles: one Ray actor per host, in one placement group.

OpenRLHF's layout (Hu et al. 2024, arXiv:2405.11143, Sec. 3): one Ray actor per role, with
`--colocate actor,ref` hosting the reference inside the actor's process and `--colocate
critic,reward` the reward model inside the critic's. `RoleHost` is the Ray actor that hosts one
or more of the roles of training.ppo_roles; `RoleGroup` creates the hosts in one placement group
(one bundle per host, fractional CPUs so that four roles fit on a 2-CPU local Ray) and routes
calls. The actor can run as N data-parallel workers whose gradients are all-reduced with
torch.distributed (gloo on CPU).

    python -c "from training.ray_roles import hosts_for; print(hosts_for(1, True, False))"
"""

from __future__ import annotations

import os
import socket
from typing import Any

from training.ppo_batch import RoleError
from training.ppo_config import PPOConfig
from training.ppo_roles import ActorRole, CriticRole, ReferenceRole, RewardRole

ROLE_CLASSES = {"actor": ActorRole, "ref": ReferenceRole, "critic": CriticRole,
                "reward": RewardRole}


def hosts_for(actor_workers: int, colocate_actor_ref: bool,
              colocate_critic_reward: bool) -> list[tuple[str, ...]]:
    """The roles of each Ray actor to create, in order (actor workers first).

    >>> hosts_for(1, False, False)
    [('actor',), ('ref',), ('critic',), ('reward',)]
    """
    hosts: list[tuple[str, ...]] = [("actor", "ref") if colocate_actor_ref else ("actor",)
                                    for _ in range(actor_workers)]
    if not colocate_actor_ref:
        hosts.append(("ref",))
    hosts += [("critic", "reward")] if colocate_critic_reward else [("critic",), ("reward",)]
    return hosts


class RoleHost:
    """What runs inside one Ray actor: one or more roles, sharing a process (and its CPUs)."""

    def __init__(self, roles: tuple[str, ...], cfg: PPOConfig, rank: int, world_size: int):
        if cfg.threads_per_worker:
            import torch

            torch.set_num_threads(cfg.threads_per_worker)
        self.names = roles
        self.roles: dict[str, Any] = {}
        for name in roles:
            self.roles[name] = (ActorRole(cfg, rank, world_size) if name == "actor"
                                else ROLE_CLASSES[name](cfg))

    def call(self, role: str, method: str, *args: Any, **kwargs: Any) -> Any:
        if role not in self.roles:
            raise RoleError(f"this worker hosts {self.names}, not {role!r}")
        return getattr(self.roles[role], method)(*args, **kwargs)

    def ping(self) -> dict[str, Any]:
        return {"roles": list(self.names), "pid": os.getpid()}

    def rendezvous(self) -> tuple[str, int]:
        """An address and free port for the actor workers' process group (asked of rank 0)."""
        import ray

        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), int(port)


class RoleGroup:
    """Driver side: creates the RoleHosts in a placement group and routes calls to roles."""

    def __init__(self, cfg: PPOConfig, *, ready_timeout_s: float = 600.0,
                 local: bool = True):
        self.cfg = cfg
        self.local = local  # a local Ray cannot grow: refuse an impossible layout at once
        self.layout = hosts_for(cfg.actor_workers, cfg.colocate_actor_ref,
                                cfg.colocate_critic_reward)
        self.ready_timeout_s = ready_timeout_s
        self.placement_group: Any = None
        self.handles: list[Any] = []

    # --- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        import ray
        from ray.util.placement_group import placement_group

        bundle: dict[str, float] = {"CPU": self.cfg.cpus_per_worker}
        if self.cfg.gpus_per_worker:
            bundle["GPU"] = self.cfg.gpus_per_worker
        if self.local:
            have = ray.cluster_resources()
            for resource, amount in bundle.items():
                if amount * len(self.layout) > have.get(resource, 0.0) + 1e-9:
                    raise RoleError(
                        f"{len(self.layout)} Ray actors x {amount} {resource} exceed the local "
                        f"Ray's {have.get(resource, 0.0):g} {resource}; lower cpus_per_worker/"
                        "gpus_per_worker or colocate roles (--colocate actor,ref)")
        self.placement_group = placement_group([dict(bundle) for _ in self.layout],
                                               strategy="PACK")
        ready, _ = ray.wait([self.placement_group.ready()], timeout=self.ready_timeout_s)
        if not ready:
            self.stop()
            raise RoleError(f"Ray cannot place {len(self.layout)} workers x {bundle} "
                            f"(available: {ray.available_resources()}); lower cpus_per_worker, "
                            "colocate roles or add nodes")
        self.handles = [self._create(i) for i in range(len(self.layout))]
        try:
            ray.get([h.ping.remote() for h in self.handles], timeout=self.ready_timeout_s)
        except ray.exceptions.RayError as exc:  # a role's __init__ raised (bad model, ...)
            self.stop()
            raise RoleError(f"a PPO role failed to start: {str(exc).strip()[-800:]}") from exc
        self.connect_actor_workers()

    def _create(self, index: int) -> Any:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        roles = self.layout[index]
        rank = index if "actor" in roles else 0
        remote_cls = ray.remote(RoleHost)
        return remote_cls.options(
            num_cpus=self.cfg.cpus_per_worker, num_gpus=self.cfg.gpus_per_worker,
            max_restarts=self.cfg.max_step_retries, max_task_retries=0,
            name=None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self.placement_group, placement_group_bundle_index=index),
        ).remote(roles, self.cfg, rank, self.cfg.actor_workers)

    def connect_actor_workers(self) -> None:
        import ray

        if self.cfg.actor_workers == 1:
            return
        address, port = ray.get(self.actors[0].rendezvous.remote())
        ray.get([h.call.remote("actor", "init_process_group", address, port)
                 for h in self.actors])

    def revive(self) -> list[int]:
        """Replace hosts that are dead for good; returns the indices of every host that lost
        its state (dead or restarted by Ray), which then need restoring from a checkpoint."""
        import ray
        from ray.exceptions import RayActorError

        lost = []
        for index, handle in enumerate(self.handles):
            try:
                ray.get(handle.ping.remote(), timeout=self.ready_timeout_s)
            except (RayActorError, ray.exceptions.GetTimeoutError):
                self.handles[index] = self._create(index)
                ray.get(self.handles[index].ping.remote(), timeout=self.ready_timeout_s)
            lost.append(index)
        self.connect_actor_workers()
        return lost

    def stop(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for handle in self.handles:
            ray.kill(handle)
        self.handles = []
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None

    # --- routing ------------------------------------------------------------------------
    def _host_of(self, role: str) -> Any:
        for handle, roles in zip(self.handles, self.layout, strict=True):
            if role in roles:
                return handle
        raise RoleError(f"no host for role {role!r}")

    @property
    def actors(self) -> list[Any]:
        return [h for h, roles in zip(self.handles, self.layout, strict=True) if "actor" in roles]

    def ref_for(self, shard_index: int) -> Any:
        """The reference that scores shard i: the actor worker's own when colocated."""
        return self.actors[shard_index] if self.cfg.colocate_actor_ref else self._host_of("ref")

    @property
    def critic(self) -> Any:
        return self._host_of("critic")

    @property
    def reward(self) -> Any:
        return self._host_of("reward")

    @property
    def ray_actor_count(self) -> int:
        return len(self.handles)


__all__ = ["ROLE_CLASSES", "RoleGroup", "RoleHost", "hosts_for"]
