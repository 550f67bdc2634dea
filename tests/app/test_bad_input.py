"""Bad input over real HTTP never gets a 5xx and writes nothing: bodies that fail validation
while holding NaN or a lone surrogate (which FastAPI's default handler cannot echo back), JSON
nested too deeply, and text /v1 cannot tokenize. Raw bytes are sent, because `json.dumps`
cannot produce these bodies (and httpx's `json=` would refuse them)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlmodel import func, select

from app.main import create_app
from app.settings import Settings
from store.models import Label, Prompt
from tests.app.helpers import add_task, add_user, live_server
from tests.app.serving_fixtures import *  # noqa: F403  (fixtures and helpers)


def _rows(db: Any, table: Any) -> int:
    with db.read() as session:
        return int(session.exec(select(func.count()).select_from(table)).one())


@pytest.fixture
def api(sqlite_db: Any, tmp_path: Any) -> Any:
    _, admin = add_user(sqlite_db, "root", "admin")
    _, ann = add_user(sqlite_db, "ann")
    with live_server(create_app(Settings(data_dir=tmp_path, serving="off"),
                                db=sqlite_db)) as url:
        yield {"url": url, "db": sqlite_db, "admin": admin, "ann": ann}


def _post(url: str, raw: bytes, token: str, **headers: str) -> httpx.Response:
    return httpx.post(url, content=raw, headers={"Authorization": f"Bearer {token}",
                                                 "Content-Type": "application/json", **headers})


STR_OR_LIST = [{"type": "list_type", "loc": ["body", "content", "list[Message]"],
                "msg": "Input should be a valid list"}]
UNICODE = "Input should be a valid string, unable to parse raw data as a unicode string"


@pytest.mark.parametrize("raw, detail", [
    (b'{"content": NaN}', [{"type": "string_type", "loc": ["body", "content", "constrained-str"],
                            "msg": "Input should be a valid string"}, *STR_OR_LIST]),
    (b'{"content": "hi", "dataset": Infinity}', [
        {"type": "string_type", "loc": ["body", "dataset"], "msg": "Input should be a valid "
         "string"}]),
    (b'{"content": "\\ud800"}', [{"type": "string_unicode", "loc": ["body", "content",
                                                                    "constrained-str"],
                                  "msg": UNICODE}, *STR_OR_LIST]),
    (b'{"content": "hi", "split": "\\udfff-x"}', [
        {"type": "string_unicode", "loc": ["body", "split"], "msg": UNICODE}]),
    (b'{"content": "hi", "\\ud800": 1}', [{"type": "string_unicode", "loc": ["body"],
                                           "msg": UNICODE}]),
])
def test_unrenderable_invalid_bodies_get_422_without_echo(api: Any, raw: bytes,
                                                          detail: list[Any]) -> None:
    response = _post(f"{api['url']}/api/prompts", raw, api["admin"])
    assert response.status_code == 422, response.text
    assert response.json() == {"detail": detail}
    assert _rows(api["db"], Prompt) == 0


def test_a_label_with_nan_or_a_surrogate_is_422_and_nothing_is_written(api: Any) -> None:
    task_id = add_task(api["db"])
    client_headers = {"Authorization": f"Bearer {api['ann']}"}
    assert httpx.get(f"{api['url']}/api/tasks/next", headers=client_headers).status_code == 200
    url = f"{api['url']}/api/tasks/{task_id}/labels"
    nan = _post(url, b'{"choice": NaN}', api["ann"], **{"Idempotency-Key": "k1"})
    assert (nan.status_code, nan.json()["detail"][0]["loc"]) == (422, ["body", "choice"])
    lone = _post(url, b'{"choice": "a", "rationale": "\\ud800"}', api["ann"],
                 **{"Idempotency-Key": "k2"})
    assert lone.status_code == 422
    assert lone.json() == {"detail": [{"type": "string_unicode", "loc": ["body", "rationale"],
                                       "msg": UNICODE}]}
    assert _rows(api["db"], Label) == 0


def test_deep_json_on_the_api_is_400(api: Any) -> None:
    raw = b'{"content": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    response = _post(f"{api['url']}/api/prompts", raw, api["admin"])
    assert response.status_code == 400
    assert _rows(api["db"], Prompt) == 0


@pytest.fixture
def v1(served_v1: Any) -> Any:
    return served_v1


def _openai(message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param,
                      "code": None}, "detail": message}


@pytest.mark.parametrize("depth", [1000, 50_000])
def test_v1_json_nested_too_deeply_is_400_in_openai_shape(v1: Any, depth: int) -> None:
    raw = (b'{"model": "v1", "messages": [{"role": "user", "content": "hi"}], "metadata": '
           + b"[" * depth + b"]" * depth + b"}")
    response = _post(f"{v1.url}/v1/chat/completions", raw, v1.token)
    assert (response.status_code, response.json()) == (
        400, _openai("the JSON body is nested too deeply"))


@pytest.mark.parametrize("raw, param", [
    (b'{"model": "v1", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
     "messages.0.content"),
    (b'{"model": "v1", "messages": [{"role": "user", "content": [{"type": "text", '
     b'"text": "\\udc00"}]}]}', "messages.0.content.0.text"),
    (b'{"model": "v1", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
     "temperature"),
])
def test_v1_unencodable_text_is_400_naming_the_field(v1: Any, raw: bytes, param: str) -> None:
    response = _post(f"{v1.url}/v1/chat/completions", raw, v1.token)
    message = f"{param}: not valid text (a lone UTF-16 surrogate) or not a finite number"
    assert (response.status_code, response.json()) == (400, _openai(message, param))


def test_v1_completion_prompt_with_a_surrogate_is_400(v1: Any) -> None:
    response = _post(f"{v1.url}/v1/completions", b'{"model": "v1", "prompt": "\\ud83d"}',
                     v1.token)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt"
