"""Schema fuzzing: schemathesis generates requests from the app's OpenAPI document (valid and
invalid bodies, parameters, headers) for every operation, as an admin and as an annotator, on a
store with tasks, leases and labels in it. No request may get a 5xx; every response must match
the documented schema.

    python -m pytest tests/app/test_schema_fuzz.py          # 25 examples per operation
    PREFLOOP_FUZZ_EXAMPLES=200 python -m pytest tests/app/test_schema_fuzz.py
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from app.main import create_app
from app.settings import Settings
from store.db import Database
from store.models import TaskKind
from tests.app.helpers import add_task, add_user

EXAMPLES = int(os.environ.get("PREFLOOP_FUZZ_EXAMPLES", "25"))


@pytest.fixture
def fuzz_env(sqlite_db: Database, tmp_path: Path) -> dict[str, Any]:
    db = sqlite_db
    _, admin = add_user(db, "root", "admin")
    _, annotator = add_user(db, "ann")
    for kind in TaskKind:
        for i in range(3):
            add_task(db, kind, prompt=f"{kind.value} prompt {i}")
    app = create_app(Settings(data_dir=tmp_path, submit_rate_per_s=1000, submit_burst=1000),
                     db=db)
    return {"app": app, "tokens": (admin, annotator)}


@pytest.fixture
def fuzz_schema(fuzz_env: dict[str, Any]) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_env["app"])


schema = schemathesis.pytest.from_fixture("fuzz_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: Any, fuzz_env: dict[str, Any]) -> None:
    for token in fuzz_env["tokens"]:
        headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}
        response = case.call(headers=headers)
        assert response.status_code < 500, (case.method, case.path, response.text)
        case.validate_response(response, checks=[not_a_server_error,
                                                 response_schema_conformance])
