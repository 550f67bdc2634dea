"""Fixtures for the web app: a TestClient on the REST API over the store fixtures (SQLite and
PostgreSQL), and accounts with tokens."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from store.db import Database


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
    """make_client(db, ui=None, **settings) -> a TestClient on the app; without `ui` (e.g.
    labeling.ui.mount_labeling_ui) it has no Gradio UI."""
    clients: list[TestClient] = []

    def make(db: Database, *, ui: Callable[[FastAPI], None] | None = None,
             **overrides: Any) -> TestClient:
        settings = Settings(data_dir=tmp_path, **overrides)
        client = TestClient(create_app(settings, db=db, ui=ui),
                            base_url="http://127.0.0.1")
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
