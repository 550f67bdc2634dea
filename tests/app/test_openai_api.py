"""The OpenAI-compatible endpoint, through the real `openai` client against a live server:
answers equal the engine's own greedy output, streaming equals non-streaming, usage counts,
stop strings, bad bodies get 4xx with a message, and the upstream (proxy) engine."""

from __future__ import annotations

import httpx
import openai
import pytest

from app.policy_engine import Busy, Delta, GenerationRequest, ServedPolicy
from store import deployments
from tests.app.serving_fixtures import *  # noqa: F403  (fixtures and helpers)
from tests.app.serving_fixtures import expected, register, wait_until
from training.generation import StopText

CHAT = [{"role": "user", "content": "Name a colour."}]


# -- pure pieces ------------------------------------------------------------------------------


def test_stop_text_holds_back_possible_stop_prefixes_and_cuts_at_the_stop():
    stop = StopText(["END", "xy"])
    assert stop.feed("abc") == "abc"
    assert stop.feed("abcE") == ""          # "E" could be the start of "END"
    assert stop.feed("abcEN") == ""
    assert stop.feed("abcENx") == "EN"      # "EN" was not, "x" could start "xy"
    assert stop.feed("abcENDxyz") == "" and stop.stopped and stop.text == "abc"
    free = StopText([])
    assert free.feed("ab") == "ab" and free.feed("abc\ufffd") == "c"
    assert free.feed("abcé", final=True) == "é" and free.text == "abcé"


# -- the endpoint ---------------------------------------------------------------------------


def test_models_lists_the_deployed_version_and_needs_a_token(served_v1):
    models = served_v1.client().models.list()
    assert [(m.id, m.owned_by) for m in models.data] == [("v1", "prefloop")]
    assert served_v1.client().models.retrieve("deployed").id == "v1"
    with pytest.raises(openai.AuthenticationError):
        served_v1.client(api_key="wrong").models.list()
    assert httpx.get(f"{served_v1.url}/v1/models").status_code == 401


def test_chat_completion_is_the_engines_greedy_answer_with_usage(served_v1, tiny_policies):
    reference = expected(tiny_policies["v1"], CHAT, 12)
    response = served_v1.client().chat.completions.create(
        model="v1", messages=CHAT, max_tokens=12, temperature=0)
    choice = response.choices[0]
    assert (response.model, choice.message.role, choice.message.content, choice.finish_reason) \
        == ("v1", "assistant", reference.text, reference.finish_reason)
    assert (response.usage.prompt_tokens, response.usage.completion_tokens,
            response.usage.total_tokens) == (reference.prompt_tokens, reference.completion_tokens,
                                             reference.prompt_tokens + reference.completion_tokens)
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")


def test_streamed_chat_equals_the_plain_answer_and_ends_with_usage(served_v1, tiny_policies):
    reference = expected(tiny_policies["v1"], CHAT, 12)
    chunks = list(served_v1.client().chat.completions.create(
        model="deployed", messages=CHAT, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert text == reference.text
    assert finishes[-1] == reference.finish_reason and set(finishes[:-1]) == {None}
    assert {c.model for c in chunks} == {"v1"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        reference.completion_tokens
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_text_completion_plain_and_streamed(served_v1, tiny_policies):
    reference = expected(tiny_policies["v1"], "Question: 2+2?\nAnswer:", 10)
    client = served_v1.client()
    plain = client.completions.create(model="v1", prompt="Question: 2+2?\nAnswer:",
                                      max_tokens=10, temperature=0)
    assert (plain.choices[0].text, plain.usage.prompt_tokens) == (reference.text,
                                                                   reference.prompt_tokens)
    streamed = list(client.completions.create(model="v1", prompt="Question: 2+2?\nAnswer:",
                                              max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == reference.text
    assert streamed[-1].choices[0].finish_reason == reference.finish_reason


def test_stop_string_cuts_the_answer_in_both_modes(served_v1, tiny_policies):
    reference = expected(tiny_policies["v1"], "Hello", 20).text
    stop = reference[6:9]
    assert stop and reference.find(stop) >= 0
    cut = reference[:reference.find(stop)]
    client = served_v1.client()
    plain = client.completions.create(model="v1", prompt="Hello", max_tokens=20, temperature=0,
                                      stop=[stop])
    assert (plain.choices[0].text, plain.choices[0].finish_reason) == (cut, "stop")
    streamed = client.completions.create(model="v1", prompt="Hello", max_tokens=20,
                                         temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_seeded_sampling_repeats_and_n_gives_several_choices(served_v1):
    client = served_v1.client()
    args = {"model": "v1", "prompt": "Once", "max_tokens": 8, "temperature": 1.0, "seed": 7}
    first, again = (client.completions.create(**args).choices[0].text for _ in range(2))
    assert first == again
    several = client.completions.create(**args, n=3)
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert several.choices[0].text == first


@pytest.mark.parametrize("body, message", [
    ({"model": "v1"}, "messages: Field required"),
    ({"model": "v1", "messages": []}, "messages: List should have at least 1 item"),
    ({"model": "v1", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"model": "v1", "messages": CHAT, "temperature": 3}, "temperature"),
    ({"model": "v1", "messages": CHAT, "max_tokens": 0}, "max_tokens"),
    ({"model": "v1", "messages": CHAT, "max_tokens": 10**6}, "this server allows at most 1024"),
    ({"model": "v1", "messages": CHAT, "stream": True, "n": 2}, "stream with n > 1"),
    ({"model": "v1", "messages": CHAT, "tools": [{"type": "function"}]}, "'tools' is not "
     "supported"),
    ({"model": "v1", "messages": CHAT, "logprobs": True, "stream": True},
     "non-streaming requests only"),
    ({"model": "v1", "messages": CHAT, "top_logprobs": 3}, "top_logprobs needs logprobs"),
    ({"model": "v1", "messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"model": "v1", "messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, "up to 4"),
    ({"model": "v1", "messages": CHAT, "seed": -1}, "seed"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_chat_bodies_get_400_with_a_message(served_v1, body, message):
    response = httpx.post(f"{served_v1.url}/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {served_v1.token}"})
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]
    assert response.json()["detail"] == response.json()["error"]["message"]


def test_bad_completion_bodies_and_unknown_models_get_4xx(served_v1):
    client = served_v1.client(max_retries=0)
    with pytest.raises(openai.BadRequestError, match="batches of prompts"):
        client.completions.create(model="v1", prompt=["a", "b"])
    with pytest.raises(openai.BadRequestError, match="the prompt is empty"):
        client.completions.create(model="v1", prompt="")
    with pytest.raises(openai.NotFoundError, match="'v9' is not served here; use one of: v1"):
        client.completions.create(model="v9", prompt="x")
    with pytest.raises(openai.BadRequestError, match="more than the model's context"):
        client.completions.create(model="v1", prompt="word " * 1100, max_tokens=10)
    response = httpx.post(f"{served_v1.url}/v1/completions", content=b"{not json",
                          headers={"Authorization": f"Bearer {served_v1.token}"})
    assert response.status_code == 400


def test_nothing_deployed_and_serving_off_answer_404(sqlite_db, serve):
    app = serve(sqlite_db)
    with pytest.raises(openai.NotFoundError, match="no policy version is serving yet"):
        app.client(max_retries=0).completions.create(model="deployed", prompt="x")
    off = serve(sqlite_db, serving="off")
    response = httpx.post(f"{off.url}/v1/completions", json={"model": "x", "prompt": "x"},
                          headers={"Authorization": f"Bearer {off.token}"})
    assert (response.status_code, response.json()["detail"]) == (
        404, "serving is off (PREFLOOP_SERVING=off)")


def test_a_full_queue_answers_503_with_retry_after(served_v1):
    class Full:
        policy = ServedPolicy(1, "v1", "tiny", "x")

        def submit(self, request, emit):
            raise Busy("32 requests are already waiting; retry")

        def close(self):
            pass

    slot = served_v1.manager.acquire("v1")
    slot.release()
    original, slot.engine = slot.engine, Full()
    try:
        response = httpx.post(f"{served_v1.url}/v1/completions",
                              json={"model": "v1", "prompt": "x"},
                              headers={"Authorization": f"Bearer {served_v1.token}"})
    finally:
        slot.engine = original
    assert (response.status_code, response.headers["retry-after"]) == (503, "1")
    assert response.json()["error"]["type"] == "overloaded"


def test_serving_status_names_the_current_version_for_admins(served_v1):
    response = httpx.get(f"{served_v1.url}/v1/serving",
                         headers={"Authorization": f"Bearer {served_v1.token}"})
    body = response.json()
    assert (response.status_code, body["backend"], body["current"]["name"],
            body["previous"], body["last_switch"]["to_name"]) == (200, "hf", "v1", None, "v1")


def test_local_engine_streams_deltas_that_add_up_to_the_answer(tiny_policies):
    from app.local_engine import LocalEngine
    from app.policy_engine import Done

    engine = LocalEngine(ServedPolicy(1, "v1", "tiny", str(tiny_policies["v1"])))
    events = []
    done = __import__("threading").Event()

    def emit(event):
        events.append(event)
        if not isinstance(event, Delta):
            done.set()

    try:
        engine.submit(GenerationRequest(prompt="Hello", max_tokens=15, temperature=0), emit)
        assert done.wait(60)
    finally:
        engine.close()
    assert isinstance(events[-1], Done)
    deltas = [e.text for e in events if isinstance(e, Delta)]
    assert len(deltas) > 1 and "".join(deltas) == events[-1].generation.text


# -- the upstream engine ----------------------------------------------------------------------


def test_upstream_engine_proxies_an_openai_compatible_server(sqlite_db, serve, served_v1,
                                                             tiny_policies):
    """A second app with PREFLOOP_SERVING=upstream in front of the first one's /v1."""
    from store import migrate
    from store.db import Database

    front_db = Database.from_url(f"sqlite:///{tiny_policies['v1'].parent}/front.db")
    migrate.upgrade(front_db.engine)
    policy = register(front_db, "front-v1", tiny_policies["v1"])
    front_db.run_write(lambda s: deployments.promote(s, policy_id=policy, actor="test"))
    front = serve(front_db, serving="upstream", serving_upstream_url=f"{served_v1.url}/v1",
                  serving_upstream_model="v1", serving_upstream_api_key=served_v1.token)
    wait_until(lambda: front.manager.models())
    reference = expected(tiny_policies["v1"], CHAT, 12)
    client = front.client()
    plain = client.chat.completions.create(model="front-v1", messages=CHAT, max_tokens=12,
                                           temperature=0)
    assert (plain.model, plain.choices[0].message.content, plain.usage.completion_tokens) == (
        "front-v1", reference.text, reference.completion_tokens)
    streamed = client.chat.completions.create(model="front-v1", messages=CHAT, max_tokens=12,
                                              temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
        reference.text
    # The upstream's own 400 (a prompt over the tiny model's context) reaches the client.
    with pytest.raises(openai.BadRequestError, match=r"upstream answered 400.*context"):
        client.with_options(max_retries=0).completions.create(
            model="front-v1", prompt="word " * 1100, max_tokens=10)
    front_db.dispose()
