"""The load benchmark (benchmarks/app_load.py) at a small scale, including SIGKILLs of the
server mid-run: nothing acknowledged is lost, nothing is stored twice, no 5xx, and the database
checks clean. (The 50-annotator, 60-second figures come from running the script itself.)"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import _pg_available

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "app_load.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("app_load", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["app_load"] = module
    spec.loader.exec_module(module)
    return module


def _check(results: object) -> None:
    r = results
    assert r.acked > 0  # type: ignore[attr-defined]
    assert (r.lost, r.duplicated, r.over_overlap, r.label_id_mismatch, r.http_5xx,  # type: ignore[attr-defined]
            r.gave_up, r.stored_not_acked) == (0, 0, 0, 0, 0, 0, 0)  # type: ignore[attr-defined]


def test_small_load_with_server_kills_on_sqlite(tmp_path: Path) -> None:
    app_load = _load()
    cfg = app_load.LoadConfig(backend="sqlite", annotators=6, duration_s=9.0, think_max_s=0.2,
                              kills=2, tasks=400, warmup_s=0.0, baseline_ops=20,
                              workdir=tmp_path)
    results = app_load.run(cfg)
    _check(results)
    assert len(results.restarts_s) == 2
    assert results.integrity == "integrity_check ok, foreign_key_check 0 rows"


@pytest.mark.slow
@pytest.mark.postgres
def test_small_load_with_server_kills_on_postgresql(tmp_path: Path) -> None:
    if not _pg_available():
        pytest.skip("no PostgreSQL server")
    app_load = _load()
    cfg = app_load.LoadConfig(backend="postgresql", annotators=10, duration_s=12.0,
                              think_max_s=0.2, kills=2, tasks=600, warmup_s=0.0,
                              baseline_ops=20, workdir=tmp_path)
    results = app_load.run(cfg)
    _check(results)
    assert results.integrity == "constraints hold; 0 orphan labels"
