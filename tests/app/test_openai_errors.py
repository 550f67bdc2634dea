"""/v1 speaks OpenAI's error shape for every 4xx (401, 403, 404, 405, 413 and 400s too), so the
`openai` client raises the matching exception class with the server's message, and every
request parameter the server does not implement is refused with a 400 that names it."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.app.helpers import add_user
from tests.app.serving_fixtures import *  # noqa: F403  (fixtures and helpers)
from tests.app.serving_fixtures import deploy_and_serve

CHAT = [{"role": "user", "content": "Name a colour."}]
NOT_AUTHENTICATED = "not authenticated: send 'Authorization: Bearer <token>' or log in"


@pytest.fixture
def v1(sqlite_db: Any, serve: Any, tiny_policies: Any) -> Any:
    return deploy_and_serve(serve, sqlite_db, "v1", tiny_policies["v1"], max_body_bytes=4096)


def _shape(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error", "detail"} and set(body["error"]) == {
        "message", "type", "param", "code"}, body
    assert body["detail"] == body["error"]["message"]
    return dict(body["error"])


def test_401_is_an_openai_authentication_error_with_the_message(v1: Any) -> None:
    client = v1.client(api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model="v1", messages=CHAT)
    assert (caught.value.status_code, caught.value.code, caught.value.type,
            caught.value.param) == (401, "invalid_api_key", "invalid_request_error", None)
    assert caught.value.body == {"message": NOT_AUTHENTICATED, "type": "invalid_request_error",
                                 "param": None, "code": "invalid_api_key"}
    with pytest.raises(openai.AuthenticationError, match="not authenticated"):
        client.models.list()
    raw = httpx.get(f"{v1.url}/v1/models")
    assert (raw.status_code, raw.headers["www-authenticate"], _shape(raw)["code"]) == (
        401, "Bearer", "invalid_api_key")


def test_403_404_405_413_keep_the_shape(v1: Any) -> None:
    _, annotator = add_user(v1.db, "ann")
    with pytest.raises(openai.PermissionDeniedError, match="this needs an admin account"):
        v1.client(api_key=annotator, max_retries=0).get("/serving", cast_to=dict)
    with pytest.raises(openai.NotFoundError, match="'v9' is not served here"):
        v1.client(max_retries=0).models.retrieve("v9")
    auth = {"Authorization": f"Bearer {v1.token}"}
    missing = httpx.post(f"{v1.url}/v1/embeddings", json={"input": "x"}, headers=auth)
    assert (missing.status_code, _shape(missing)) == (404, {
        "message": "Not Found", "type": "not_found_error", "param": None, "code": "not_found"})
    wrong_method = httpx.get(f"{v1.url}/v1/chat/completions", headers=auth)
    assert (wrong_method.status_code, _shape(wrong_method)["message"]) == (
        405, "Method Not Allowed")
    too_big = v1.client(max_retries=0)
    with pytest.raises(openai.APIStatusError, match="request body over 4096 bytes") as caught:
        too_big.chat.completions.create(model="v1", messages=[
            {"role": "user", "content": "x" * 5000}])
    assert (caught.value.status_code, caught.value.code) == (413, "request_too_large")


def test_a_too_long_model_name_in_the_path_is_400_not_422(v1: Any) -> None:
    response = httpx.get(f"{v1.url}/v1/models/{'m' * 300}",
                         headers={"Authorization": f"Bearer {v1.token}"})
    error = _shape(response)
    assert (response.status_code, error["param"], error["type"]) == (
        400, "model", "invalid_request_error")
    assert error["message"].startswith("invalid request: model: String should have at most")


@pytest.mark.parametrize("extra, param, message", [
    ({"response_format": {"type": "json_object"}}, "response_format",
     "'response_format' is not supported by this server; remove it"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "v", "schema": {}}}},
     "response_format", "'response_format' is not supported by this server; remove it"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools",
     "'tools' is not supported by this server; remove it"),
    ({"logprobs": True, "stream": True}, "logprobs",
     "logprobs are returned by non-streaming requests only on this server; send stream: false"),
    ({"presence_penalty": 0.5}, "presence_penalty",
     "'presence_penalty' is not supported by this server; remove it"),
    ({"parallel_tool_calls": True}, "parallel_tool_calls",
     "'parallel_tool_calls' is not supported by this server; remove it"),
    ({"extra_body": {"top_k": 5}}, "top_k",
     "'top_k' is not a parameter this server implements; remove it"),
    ({"extra_body": {"reasoning_effort": "low"}}, "reasoning_effort",
     "'reasoning_effort' is not a parameter this server implements; remove it"),
    ({"stream": True, "stream_options": {"include_obfuscation": True}},
     "stream_options.include_obfuscation",
     "stream_options 'include_obfuscation' is not supported by this server"),
    ({"stream_options": {"include_usage": True}}, "stream_options",
     "stream_options needs stream: true"),
])
def test_unimplemented_parameters_are_refused_naming_them(v1: Any, extra: dict[str, Any],
                                                          param: str, message: str) -> None:
    client = v1.client(max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="v1", messages=CHAT, max_tokens=2, **extra)
    assert (caught.value.status_code, caught.value.param, caught.value.type) == (
        400, param, "invalid_request_error")
    assert caught.value.body["message"] == message  # type: ignore[index]


def test_message_fields_the_server_would_drop_are_refused(v1: Any) -> None:
    client = v1.client(max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="v1", max_tokens=2, messages=[
            {"role": "user", "content": "hi", "name": "ann"}])
    assert caught.value.param == "messages.0.name"
    assert "Extra inputs are not permitted" in caught.value.body["message"]  # type: ignore
    with pytest.raises(openai.BadRequestError, match=r"messages\.0\.content"):
        client.chat.completions.create(model="v1", max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(openai.BadRequestError) as unsupported:
        client.completions.create(model="v1", prompt="x", max_tokens=2, suffix="end")
    assert unsupported.value.param == "suffix"


def test_neutral_values_of_unimplemented_parameters_are_accepted(v1: Any) -> None:
    plain = v1.client().chat.completions.create(model="v1", messages=CHAT, max_tokens=3,
                                                temperature=0)
    neutral = v1.client().chat.completions.create(
        model="v1", messages=CHAT, max_tokens=3, temperature=0, logprobs=False,
        presence_penalty=0, frequency_penalty=0, response_format={"type": "text"},
        tool_choice="none", user="someone")
    assert neutral.choices[0].message.content == plain.choices[0].message.content
