"""/v1 under concurrent clients: throughput of 8 clients against 1 client, same run; the
latency of a 1-token request while long ones run; and what an abandoned request costs.

The app serves the bundled SmolLM2 (or `--model`) with the local engine (continuous batching,
app/local_engine.py) in a child process (so the clients' Python does not share its GIL); the
clients are asyncio + httpx in this process, each with its own API token.

    python benchmarks/serving_concurrency.py                   # SmolLM2, ~3 min on 2 cores
    python benchmarks/serving_concurrency.py --requests 4 --max-tokens 32

Printed:
- `1 client` and `N clients`: completion tokens per second over `--requests` chat requests
  per client of `--max-tokens` tokens each (temperature 1, seeded; the model may stop early,
  the usage counts what it generated), and the ratio;
- `1-token latency while N long requests stream`: p50/p99 of `--probes` one-token requests
  sent one after another while N streams of `--long-tokens` tokens run, beside the same
  requests on an idle server;
- `abandoned request`: a client gives up on a non-streaming `--long-tokens` request after
  0.8 s; the next 1-token request's latency (the engine must drop the abandoned work).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTION = "Tell me a long story about a lighthouse keeper and a storm."


def serve(model: str, workdir: str, clients: int, ready: Any) -> None:
    """The child process: a store with `model` deployed, accounts, the app under uvicorn."""
    from datetime import timedelta

    import uvicorn

    from app.main import create_app
    from app.settings import Settings
    from store import accounts, deployments, migrate
    from store.db import Database
    from store.models import Role
    from training.models import resolve_model

    db = Database.from_url(f"sqlite:///{workdir}/bench.db")
    migrate.upgrade(db.engine)
    tokens = [db.run_write(lambda s, i=i: accounts.create_account(
        session=s, name=f"client{i}", role=Role.admin, token_ttl=timedelta(days=1)))[1]
        for i in range(clients + 2)]
    policy = db.run_write(lambda s: deployments.register_policy(
        s, name="bench", base_model=model, weights_uri=resolve_model(model)))
    db.run_write(lambda s: deployments.promote(s, policy_id=policy.id, actor="bench"))
    settings = Settings(data_dir=Path(workdir), serving_max_batch=max(16, clients + 2))
    app = create_app(settings, db=db)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                            access_log=False)
    server = uvicorn.Server(config)

    async def main() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.05)
        while not app.state.deployments.models():
            await asyncio.sleep(0.2)
        port = server.servers[0].sockets[0].getsockname()[1]
        ready.send({"url": f"http://127.0.0.1:{port}/v1", "tokens": [str(t) for t in tokens]})
        await task

    asyncio.run(main())


async def chat(client: Any, url: str, token: str, max_tokens: int, seed: int,
               stream: bool = False, timeout: float = 600.0) -> dict[str, Any]:
    body = {"model": "deployed", "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": max_tokens, "temperature": 1.0, "seed": seed}
    headers = {"Authorization": f"Bearer {token}"}
    started = time.perf_counter()
    if not stream:
        response = await client.post(f"{url}/chat/completions", json=body, headers=headers,
                                     timeout=timeout)
        response.raise_for_status()
        return {"s": time.perf_counter() - started,
                "tokens": response.json()["usage"]["completion_tokens"]}
    body.update(stream=True, stream_options={"include_usage": True})
    tokens = 0
    async with client.stream("POST", f"{url}/chat/completions", json=body, headers=headers,
                             timeout=timeout) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"usage": {' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    return {"s": time.perf_counter() - started, "tokens": tokens}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(url: str, tokens: list[str], args: argparse.Namespace) -> None:
    import httpx

    async with httpx.AsyncClient() as client:
        await chat(client, url, tokens[0], 4, 0)  # warm-up

        async def run_clients(count: int) -> tuple[int, float]:
            async def one(i: int) -> int:
                done = 0
                for r in range(args.requests):
                    done += (await chat(client, url, tokens[i], args.max_tokens,
                                        seed=1000 * i + r))["tokens"]
                return done

            started = time.perf_counter()
            counts = await asyncio.gather(*(one(i) for i in range(count)))
            return sum(counts), time.perf_counter() - started

        single, single_s = await run_clients(1)
        many, many_s = await run_clients(args.clients)
        rate_1, rate_n = single / single_s, many / many_s
        print(f"{'':34} {'tokens':>7} {'seconds':>8} {'tok/s':>8}")
        print(f"{'1 client':34} {single:7d} {single_s:8.1f} {rate_1:8.1f}")
        print(f"{f'{args.clients} clients':34} {many:7d} {many_s:8.1f} {rate_n:8.1f}"
              f"   ({rate_n / rate_1:.2f}x one client)")

        probe_token = tokens[-1]
        idle = [(await chat(client, url, probe_token, 1, seed=i))["s"]
                for i in range(args.probes)]
        streams = [asyncio.create_task(chat(client, url, tokens[i], args.long_tokens, seed=i,
                                            stream=True)) for i in range(args.clients)]
        await asyncio.sleep(1.0)  # the long ones are decoding
        busy = []
        for i in range(args.probes):
            busy.append((await chat(client, url, probe_token, 1, seed=100 + i))["s"])
            if all(s.done() for s in streams):
                break
        await asyncio.gather(*streams)
        print(f"1-token latency, idle server:          p50 {percentile(idle, .5):.3f} s  "
              f"p99 {percentile(idle, .99):.3f} s  ({len(idle)} requests)")
        print(f"1-token latency, {args.clients} long streams running: "
              f"p50 {percentile(busy, .5):.3f} s  p99 {percentile(busy, .99):.3f} s  "
              f"({len(busy)} requests)")

        with contextlib.suppress(httpx.TimeoutException):
            await chat(client, url, tokens[0], args.long_tokens, seed=7, timeout=0.8)
        after = await chat(client, url, probe_token, 1, seed=8)
        print(f"abandoned {args.long_tokens}-token request (client timeout 0.8 s), next "
              f"1-token request: {after['s']:.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--long-tokens", type=int, default=160)
    parser.add_argument("--probes", type=int, default=20)
    args = parser.parse_args()

    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    workdir = tempfile.mkdtemp(prefix="serving-bench-")
    child = context.Process(target=serve, args=(args.model, workdir, args.clients, send),
                            daemon=True)
    child.start()
    info = receive.recv()
    print(f"model={args.model} clients={args.clients} requests/client={args.requests} "
          f"max_tokens={args.max_tokens}")
    try:
        asyncio.run(measure(info["url"], info["tokens"], args))
    finally:
        child.terminate()
        child.join(10)


if __name__ == "__main__":
    main()
