"""/v1 on the local engine under concurrency, through real HTTP: requests that run together get
exactly what they get alone, an abandoned request (client timeout, a stream closed early) stops
generating, and one API token cannot run more than its limit of generations (429 in OpenAI's
error shape). The engine's steps are slowed down here, so that "still running" and "stopped"
are far apart whatever the machine's speed; nothing asserts a time."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from tests.app.serving_fixtures import *  # noqa: F403  (fixtures and helpers)
from tests.app.serving_fixtures import deploy_and_serve, expected, wait_until

CHAT = [{"role": "user", "content": "Name a colour."}]
STEP_DELAY_S = 0.02


def _engine(served: Any) -> Any:
    slot = served.manager.acquire("deployed")
    slot.release()
    return slot.engine.generator


def _slow_down(generator: Any) -> None:
    """Every forward pass of the generation engine sleeps a little first (all go through
    forward_segments)."""
    forward = generator.decoder.forward_segments

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(STEP_DELAY_S)
        return forward(*args, **kwargs)

    generator.decoder.forward_segments = slow


def _body(max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": "deployed", "messages": CHAT, "max_tokens": max_tokens, "temperature": 0,
            **extra}


def test_concurrent_requests_share_the_batch_and_get_their_own_answers(served_v1,
                                                                       tiny_policies):
    generator = _engine(served_v1)
    _slow_down(generator)
    reference = expected(tiny_policies["v1"], CHAT, 24)
    headers = {"Authorization": f"Bearer {served_v1.token}"}

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(
                f"{served_v1.url}/v1/chat/completions", headers=headers,
                json=_body(24 - i)) for i in range(6)))

    responses = asyncio.run(main())
    assert generator.peak_batch >= 2  # they were decoded together
    for i, response in enumerate(responses):
        assert response.status_code == 200
        text = response.json()["choices"][0]["message"]["content"]
        # A shorter budget gives a prefix of the longest answer (greedy, same model).
        assert reference.text.startswith(text) and len(text) > 0, (i, text)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_an_abandoned_request_stops_generating(sqlite_db, serve, tiny_policies, stream):
    served = deploy_and_serve(serve, sqlite_db, "v1", tiny_policies["v1"])
    generator = _engine(served)
    _slow_down(generator)
    headers = {"Authorization": f"Bearer {served.token}"}
    body = _body(900, stream=stream)
    with httpx.Client(timeout=120) as client:
        if stream:
            with client.stream("POST", f"{served.url}/v1/chat/completions", headers=headers,
                               json=body) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if '"content": "' in line and '"content": ""' not in line:
                        break  # the first piece of text: the client goes away here
        else:
            with pytest.raises(httpx.ReadTimeout):
                client.post(f"{served.url}/v1/chat/completions", headers=headers, json=body,
                            timeout=httpx.Timeout(120, read=1.0))
    # The engine drops the request at its next step; it would need 900 slowed steps to finish.
    wait_until(lambda: generator.busy == 0, timeout_s=60)
    assert generator.tokens_generated < 900


def test_one_token_cannot_run_more_than_its_limit(sqlite_db, serve, tiny_policies):
    served = deploy_and_serve(serve, sqlite_db, "v1", tiny_policies["v1"],
                              serving_max_concurrent_per_token=2)
    generator = _engine(served)
    _slow_down(generator)
    headers = {"Authorization": f"Bearer {served.token}"}
    url = f"{served.url}/v1/chat/completions"
    with httpx.Client(timeout=120) as client:
        streams = [client.stream("POST", url, headers=headers, json=_body(200, stream=True))
                   for _ in range(2)]
        opened = [s.__enter__() for s in streams]
        try:
            assert [r.status_code for r in opened] == [200, 200]
            refused = client.post(url, headers=headers, json=_body(4))
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            error = refused.json()["error"]
            assert error["type"] == "rate_limit_exceeded"
            assert "2 concurrent generations" in error["message"]
            n_two = client.post(url, headers=headers, json=_body(4, n=2))
            assert n_two.status_code == 429  # n counts as n generations
        finally:
            for stream in streams:
                stream.__exit__(None, None, None)
        wait_until(lambda: generator.busy == 0, timeout_s=60)
        again = client.post(url, headers=headers, json=_body(4))
        assert again.status_code == 200


def test_a_chat_template_that_refuses_the_messages_is_a_400_and_frees_the_slot(
        sqlite_db, serve, tiny_policies, tmp_path):
    import json
    import shutil

    folder = tmp_path / "v1-no-system"
    shutil.copytree(tiny_policies["v1"], folder)
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                "{{ raise_exception('System role not supported') }}{% endif %}"
                "{{ m['content'] }}{% endfor %}")
    config = folder / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": template}))
    for extra in folder.glob("chat_template.*"):
        extra.unlink()
    served = deploy_and_serve(serve, sqlite_db, "v1", folder)
    slot = served.manager.acquire("deployed")
    slot.release()
    messages = [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}]
    headers = {"Authorization": f"Bearer {served.token}"}
    for stream in (False, True):
        response = httpx.post(f"{served.url}/v1/chat/completions", headers=headers, timeout=60,
                              json={"model": "deployed", "messages": messages, "max_tokens": 4,
                                    "stream": stream})
        assert response.status_code == 400, response.text
        assert "System role not supported" in response.json()["error"]["message"]
    assert slot.in_flight == 0


def test_when_one_of_n_answers_fails_the_others_stop(sqlite_db, serve, tiny_policies):
    served = deploy_and_serve(serve, sqlite_db, "v1", tiny_policies["v1"],
                              serving_max_batch=1, serving_max_queue=1)
    generator = _engine(served)
    _slow_down(generator)
    headers = {"Authorization": f"Bearer {served.token}"}
    url = f"{served.url}/v1/chat/completions"
    with httpx.Client(timeout=120) as client, client.stream("POST", url, headers=headers,
                       json=_body(40, stream=True)) as running:
        assert running.status_code == 200
        # One runs, one may wait: of n = 3, the third is refused (503), so all three end.
        refused = client.post(url, headers=headers, json=_body(400, n=3))
        assert refused.status_code == 503
        assert refused.json()["error"]["type"] == "overloaded"
    # Neither the running stream (closed) nor the refused request's siblings keep going.
    wait_until(lambda: generator.busy == 0, timeout_s=60)
    assert generator.tokens_generated < 400


def test_n_above_the_per_token_limit_is_a_400_not_a_retry(sqlite_db, serve, tiny_policies):
    served = deploy_and_serve(serve, sqlite_db, "v1", tiny_policies["v1"],
                              serving_max_concurrent_per_token=2)
    headers = {"Authorization": f"Bearer {served.token}"}
    url = f"{served.url}/v1/chat/completions"
    assert httpx.post(url, headers=headers, json=_body(4, n=2), timeout=60).status_code == 200
    over = httpx.post(url, headers=headers, json=_body(4, n=3), timeout=60)
    assert over.status_code == 400 and over.json()["error"]["param"] == "n"
    assert "more than the 2 generations one token may run at once" in over.json()["error"][
        "message"]
