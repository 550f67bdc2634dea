"""Fixtures for the serving tests: two tiny policy versions (different seeds, so their greedy
answers differ), a store that deploys them, and a live app with its deployment manager.

Import the fixtures into a test module with `from tests.app.serving_fixtures import *`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.deploy import DeploymentManager
from app.local_engine import LocalEngine
from app.main import create_app
from app.policy_engine import (
    Engine,
    Generation,
    GenerationRequest,
    ServedPolicy,
    generate_blocking,
)
from app.settings import Settings
from store import deployments
from store.db import Database
from tests.app.helpers import add_user, live_server

__all__ = ["Served", "deploy_and_serve", "expected", "register", "serve", "served_v1",
           "tiny_policies", "wait_until"]


@pytest.fixture(scope="session")
def tiny_policies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three saved tiny Llama folders with SmolLM2's tokenizer: v1, v2, v3 (seeds 0, 1, 2)."""
    from training.models import convert_bundled_tokenizer, load_tokenizer, save_tiny_model

    tokenizer = load_tokenizer(str(convert_bundled_tokenizer("smollm2-135m-instruct")))
    root = tmp_path_factory.mktemp("policies")
    return {f"v{i + 1}": save_tiny_model(root / f"v{i + 1}", tokenizer, seed=i)
            for i in range(3)}


_EXPECTED: dict[tuple[str, str, int], Generation] = {}


def expected(weights: Path, prompt: Any, max_tokens: int) -> Generation:
    """A version's greedy answer to a prompt straight from the engine (no HTTP), computed once
    per (model, prompt, max_tokens)."""
    key = (str(weights), repr(prompt), max_tokens)
    if key not in _EXPECTED:
        engine = LocalEngine(ServedPolicy(0, "reference", "tiny", str(weights)))
        try:
            _EXPECTED[key] = generate_blocking(engine, GenerationRequest(
                prompt=prompt, max_tokens=max_tokens, temperature=0.0), timeout_s=120)
        finally:
            engine.close()
    return _EXPECTED[key]


def register(db: Database, name: str, weights: Path) -> int:
    policy = db.run_write(lambda s: deployments.register_policy(
        s, name=name, base_model="tiny", weights_uri=str(weights)))
    assert policy.id is not None
    return policy.id


def deploy_and_serve(serve: Callable[..., Served], db: Database, name: str, weights: Any,
                     **settings: Any) -> Served:
    """Register `weights` as version `name`, deploy it, and start a live app that serves it
    (returns once /v1 lists it)."""
    policy_id = register(db, name, weights)
    db.run_write(lambda s: deployments.promote(s, policy_id=policy_id, actor="test"))
    served = serve(db, **settings)
    wait_until(lambda: served.manager.models(), timeout_s=600)
    return served


def wait_until(condition: Callable[[], Any], timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


class Served:
    """A live app: base URL, an API token, the manager, the store."""

    def __init__(self, url: str, token: str, manager: Any, db: Database):
        self.url, self.token, self.manager, self.db = url, token, manager, db

    def client(self, **kw: Any) -> Any:
        from openai import OpenAI

        return OpenAI(**{"base_url": f"{self.url}/v1", "api_key": self.token} | kw)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """serve(db, load=None, **settings) -> a live app following the store's deployed version."""
    stack: list[Any] = []

    def start(db: Database, *, load: Callable[[ServedPolicy], Engine] | None = None,
              **overrides: Any) -> Served:
        options = {"serving_poll_interval_s": 0.1, "serving_smoke_timeout_s": 30.0} | overrides
        settings = Settings(data_dir=tmp_path, **options)
        app = create_app(settings, db=db)
        manager = None if settings.serving == "off" else DeploymentManager(db, settings, load=load)
        app.state.deployments = manager
        _, token = add_user(db, f"user{len(stack)}", "admin")
        context = live_server(app)
        url = context.__enter__()
        stack.append(context)
        return Served(url, token, manager, db)

    yield start
    for context in reversed(stack):
        context.__exit__(None, None, None)


@pytest.fixture
def served_v1(sqlite_db: Database, serve: Callable[..., Served],
              tiny_policies: dict[str, Path]) -> Served:
    """A live app serving the tiny version v1 (deployed)."""
    return deploy_and_serve(serve, sqlite_db, "v1", tiny_policies["v1"])
