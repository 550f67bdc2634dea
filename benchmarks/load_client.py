"""The load benchmark's HTTP client: one simulated annotator's keep-alive HTTP/1.1 connection.

benchmarks/app_load.py drives one `RawClient` per annotator against `prefloop up`; it speaks
just enough HTTP/1.1 for the API, so the load generator's own CPU stays out of the figures.

    python -c "import asyncio; from benchmarks.load_client import RawClient; \
print(asyncio.run(RawClient('127.0.0.1', 8000).request('GET', '/healthz', {})).json())"
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any


class TransportError(Exception):
    """The connection failed or broke before a whole response arrived."""


@dataclass
class Reply:
    status_code: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class RawClient:
    """One annotator's keep-alive HTTP/1.1 connection over asyncio streams.

    The load generator shares the machine with the server, and httpx spent more CPU per label
    than the server did (measured 13-18 ms a label on a loaded 2-core machine), so the figures
    measured the client. This speaks just enough HTTP/1.1 for the API: Content-Length bodies,
    keep-alive, a reconnect after any transport error (the caller then retries with the same
    Idempotency-Key, as with any lost response)."""

    def __init__(self, host: str, port: int, connect_timeout: float = 5.0,
                 timeout: float = 30.0):
        self.host, self.port = host, port
        self.connect_timeout, self.timeout = connect_timeout, timeout
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def close(self) -> None:
        if self._streams is not None:
            writer = self._streams[1]
            self._streams = None
            writer.close()

    async def request(self, method: str, path: str, headers: dict[str, str],
                      body: Any = None) -> Reply:
        try:
            return await asyncio.wait_for(self._request(method, path, headers, body),
                                          self.timeout)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError, IndexError) as exc:
            await self.close()
            raise TransportError(repr(exc)) from exc

    async def _request(self, method: str, path: str, headers: dict[str, str],
                       body: Any) -> Reply:
        if self._streams is None:
            self._streams = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), self.connect_timeout)
        reader, writer = self._streams
        payload = b"" if body is None else json.dumps(body).encode()
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                 f"Content-Length: {len(payload)}"]
        if body is not None:
            lines.append("Content-Type: application/json")
        lines += [f"{name}: {value}" for name, value in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload)
        await writer.drain()
        status_line = await reader.readuntil(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        reply_headers: dict[str, str] = {}
        while True:
            line = await reader.readuntil(b"\r\n")
            if line == b"\r\n":
                break
            name, _, value = line.decode("latin-1").partition(":")
            reply_headers[name.strip().lower()] = value.strip()
        if "content-length" not in reply_headers:
            raise ValueError("response without Content-Length")
        data = await reader.readexactly(int(reply_headers["content-length"]))
        if reply_headers.get("connection", "").lower() == "close":
            await self.close()
        return Reply(status, reply_headers, data)
