"""Start (or join) the Ray cluster that the online algorithms place their roles on.

One function decides how Ray is initialised, so that every entry point (GRPO, rejection sampling,
iterative DPO, PPO, the loop's Ray tasks, the tests) gets the same behaviour:

- local (no address): `ray.init(num_cpus=..., include_dashboard=False)`; from a source checkout
  the repository goes on the workers' `PYTHONPATH`, so actors can `import training` without an
  installed package;
- a cluster (`address="ray://head:10001"`, `"head:6379"` or `"auto"`): first a fast preflight
  (`check_ray_address`: the `ray[client]` extra for `ray://`, then a TCP connect to the address
  within the timeout), then `ray.init(address=...)` bounded by the same timeout. Without the
  bound, Ray retries an unreachable address for more than five minutes. The job ships only
  prefloop's own code (`cluster_runtime_env`): the checkout as `working_dir` from a source tree,
  the six project packages as `py_modules` from an installed wheel (whose parent folder is all of
  site-packages).

The timeout is `PREFLOOP_RAY_CONNECT_TIMEOUT` seconds (default 30; `prefloop train ...
--ray-connect-timeout` sets it for one command).

Ray's token authentication is on by default (PLATFORM.md section 7); a Ray cluster must never face
the annotator network.

    python -c "from training.raycluster import ensure_ray, shutdown_ray; ensure_ray(num_cpus=2); \
shutdown_ray()"
"""

from __future__ import annotations

import importlib.util
import os
import socket
import threading
import time
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
# The importable packages of prefloop (pyproject's packages.find include list); a Ray task may run
# a function of any of them (the loop's stages import store, feedback, app, training).
PROJECT_PACKAGES = ("app", "feedback", "labeling", "loop", "store", "training")
# Never shipped to a cluster: environments, outputs, caches, VCS data.
WORKING_DIR_EXCLUDES = [".venv", ".git", "runs", "prefloop-data", "**/__pycache__",
                        ".mypy_cache", ".ruff_cache", ".pytest_cache", "*.safetensors", "*.gguf"]
CONNECT_TIMEOUT_ENV = "PREFLOOP_RAY_CONNECT_TIMEOUT"
DEFAULT_CONNECT_TIMEOUT_S = 30.0
CLIENT_EXTRA_HINT = 'pip install "ray[client]"'


class RayConnectError(RuntimeError):
    """Ray cannot be reached at the given address (or cannot speak its protocol here)."""


def connect_timeout() -> float:
    """Seconds to wait for a Ray cluster (`PREFLOOP_RAY_CONNECT_TIMEOUT`, default 30)."""
    raw = os.environ.get(CONNECT_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_CONNECT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise RayConnectError(f"{CONNECT_TIMEOUT_ENV}={raw!r} is not a number of seconds"
                              ) from None
    if not value > 0 or value == float("inf"):
        raise RayConnectError(f"{CONNECT_TIMEOUT_ENV}={raw!r} must be a positive number of "
                              "seconds")
    return value


def is_source_checkout(root: Path) -> bool:
    """True when `root` is prefloop's source tree (its pyproject.toml names the project), False
    for an installed layout, where `root` is site-packages holding every other package too."""
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file():
        return False
    try:
        name = tomllib.loads(pyproject.read_text()).get("project", {}).get("name")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError):
        return False
    return name == "prefloop"


def cluster_runtime_env(root: Path = REPO_ROOT) -> dict[str, Any]:
    """The runtime_env a cluster job gets: only prefloop's code, never all of site-packages.

    A source checkout ships as `working_dir` (so the config files, examples and the top-level
    `cli.py` come along) minus environments, outputs and weights; an installed layout ships the
    project's package folders found under `root` as `py_modules`.
    """
    if is_source_checkout(root):
        return {"working_dir": str(root), "excludes": list(WORKING_DIR_EXCLUDES)}
    modules = [str(root / name) for name in PROJECT_PACKAGES if (root / name / "__init__.py")
               .is_file()]
    if not modules:
        raise RayConnectError(f"no prefloop package found under {root} to ship to the cluster")
    return {"py_modules": modules, "excludes": ["**/__pycache__"]}


def local_runtime_env(root: Path = REPO_ROOT, pythonpath: str = "") -> dict[str, Any]:
    """The runtime_env of a local Ray: a source checkout first on the workers' PYTHONPATH (an
    installed package is importable by the workers anyway, being on the same interpreter)."""
    parts = [str(root)] if is_source_checkout(root) else []
    parts += [pythonpath] if pythonpath else []
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(parts)}} if parts else {}


def _auto_address() -> str:
    """What `auto` means here: RAY_ADDRESS, else the cluster `ray start` recorded on this
    machine (Ray's own lookup, which is quick; only joining an address can hang)."""
    from ray._private.services import get_ray_address_from_environment

    try:
        found = get_ray_address_from_environment("auto", None)
    except ConnectionError:
        found = None
    if not found or found == "auto":
        raise RayConnectError("--ray-address auto: no running Ray cluster found on this machine "
                              "(start one with `ray start --head`, or give HOST:6379)")
    return str(found)


def _host_port(address: str) -> tuple[str, int]:
    """host and port of `ray://host:port` or `host:port`."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise RayConnectError(f"Ray address {address!r} is not ray://HOST:PORT, HOST:PORT or auto")
    return parts.hostname, port


def check_ray_address(address: str, timeout: float | None = None) -> None:
    """Fail fast, with a message naming the address, when a Ray cluster cannot be joined there.

    Checks the `ray[client]` extra (grpcio) for a `ray://` address and that something accepts a
    TCP connection at the address within `timeout` seconds. Raises RayConnectError.
    """
    timeout = connect_timeout() if timeout is None else timeout
    shown = address
    if address == "auto":
        address = _auto_address()
        shown = f"auto ({address})"
    try:
        with socket.create_connection(_host_port(address), timeout=timeout):
            pass
    except TimeoutError:
        raise RayConnectError(f"no Ray cluster answered at {shown} within {timeout:g} s "
                              f"(raise {CONNECT_TIMEOUT_ENV} or --ray-connect-timeout if it "
                              "is slow to start)") from None
    except OSError as exc:
        raise RayConnectError(f"no Ray cluster at {shown}: {exc.strerror or exc}") from None
    if address.startswith("ray://") and importlib.util.find_spec("grpc") is None:
        raise RayConnectError(f"{address} is a Ray Client address, which needs the ray[client] "
                              f"extra: {CLIENT_EXTRA_HINT} (or give the cluster's GCS address "
                              "HOST:6379 from a machine inside the cluster)")


def _init_within(timeout: float, shown_s: float, address: str, **kwargs: Any) -> None:
    """`ray.init(address=...)` on a daemon thread, given up after `timeout` seconds.

    Ray's own connect loop cannot be bounded by a parameter (a silent address retries for more
    than five minutes); the command then exits, which ends the abandoned thread with it.
    """
    import ray

    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            ray.init(address=address, **kwargs)
            outcome.append(None)
        except BaseException as exc:  # handed to the caller's thread below
            outcome.append(exc)

    thread = threading.Thread(target=connect, name="ray-connect", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise RayConnectError(f"could not join the Ray cluster at {address} within {shown_s:g} s "
                              f"(something listens there but Ray did not answer; raise "
                              f"{CONNECT_TIMEOUT_ENV} or --ray-connect-timeout if it is slow)")
    error = outcome[0]
    if error is not None:
        raise RayConnectError(f"could not join the Ray cluster at {address}: {error}") from error


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None,
               timeout: float | None = None) -> None:
    """Initialise Ray once per process; later calls are no-ops.

    Args:
        address: a Ray cluster address (`ray://head:10001`, `head:6379`, `auto`); None starts a
            local instance inside this process's session.
        num_cpus: CPUs a local instance advertises (None: all cores). Ignored with an address,
            where the cluster's own resources apply.
        timeout: seconds to wait for a cluster (default `connect_timeout()`).

    Raises:
        RayConnectError: the cluster cannot be joined (message names the address).
    """
    import ray

    if ray.is_initialized():
        return
    if address:
        timeout = connect_timeout() if timeout is None else timeout
        started = time.monotonic()
        check_ray_address(address, timeout)
        remaining = max(timeout - (time.monotonic() - started), 1.0)
        _init_within(remaining, timeout, address, runtime_env=cluster_runtime_env(),
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
        runtime_env=local_runtime_env(REPO_ROOT, os.environ.get("PYTHONPATH", "")),
        log_to_driver=True,
    )


def shutdown_ray() -> None:
    """Stop Ray if this process started or joined it (safe to call when it is not running)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


__all__ = ["CONNECT_TIMEOUT_ENV", "PROJECT_PACKAGES", "REPO_ROOT", "RayConnectError",
           "check_ray_address", "cluster_runtime_env", "connect_timeout", "ensure_ray",
           "is_source_checkout", "local_runtime_env", "shutdown_ray"]
