"""Start (or join) the Ray cluster that the online algorithms place their roles on.

One function decides how Ray is initialised, so that every entry point (GRPO, rejection sampling,
iterative DPO, PPO, the tests) gets the same behaviour:

- local (no address): `ray.init(num_cpus=..., include_dashboard=False)` with the repository on the
  workers' `PYTHONPATH`, so actors can `import training` without an installed package;
- a cluster (`address="ray://host:10001"` or `"auto"`): `ray.init(address=...)` with the repository
  shipped as the job's `working_dir` (virtualenvs, runs and caches excluded).

Ray's token authentication is on by default (PLATFORM.md section 7); a Ray cluster must never face
the annotator network.

    python -c "from training.raycluster import ensure_ray, shutdown_ray; ensure_ray(num_cpus=2); \
shutdown_ray()"
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# Never shipped to a cluster: environments, outputs, caches, VCS data.
WORKING_DIR_EXCLUDES = [".venv", ".git", "runs", "prefloop-data", "**/__pycache__",
                        ".mypy_cache", ".ruff_cache", ".pytest_cache", "*.safetensors", "*.gguf"]


def _worker_pythonpath() -> str:
    """The repository first, then whatever PYTHONPATH the driver already had."""
    existing = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join(p for p in (str(REPO_ROOT), existing) if p)


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Initialise Ray once per process; later calls are no-ops.

    Args:
        address: a Ray cluster address (`ray://head:10001`, `auto`); None starts a local
            instance inside this process's session.
        num_cpus: CPUs a local instance advertises (None: all cores). Ignored with an address,
            where the cluster's own resources apply.
    """
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, runtime_env={"working_dir": str(REPO_ROOT),
                                               "excludes": WORKING_DIR_EXCLUDES},
                 log_to_driver=True)
        return
    # A local Ray starts its workers at niceness 15: on a busy machine (the app serving beside a
    # round) the stage's workers then starve behind everything else. They are the main work.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        # Workers get OMP_NUM_THREADS from their actor's num_cpus; rollout actors call
        # torch.set_num_threads themselves (training.rollout_ray.RayRolloutEngine).
        runtime_env={"env_vars": {"PYTHONPATH": _worker_pythonpath()}},
        log_to_driver=True,
    )


def shutdown_ray() -> None:
    """Stop Ray if this process started or joined it (safe to call when it is not running)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


__all__ = ["REPO_ROOT", "ensure_ray", "shutdown_ray"]
