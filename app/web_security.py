"""What the browser-facing side enforces beyond authentication: a Content-Security-Policy on
every page, the client address behind trusted proxies, and the Gradio endpoints that are off.

CSP: pages get `script-src 'self' 'nonce-...'`, so only the scripts the server itself wrote
into the page (each `<script>` tag gets this response's nonce) and same-origin script files run;
an inline script or event handler that reaches the DOM any other way (injected model text) is
blocked. Gradio escapes `<` inside the JSON it embeds and Jinja escapes the rest, so every
literal `<script` in a served page is the template's own. Extra inline scripts that the Gradio
frontend inserts itself (the labeling UI's keyboard shortcuts, passed as `head`) are allowed
by their SHA-256 (`script_hashes`, on Gradio's pages only). Styles stay 'unsafe-inline'
(Gradio sets style attributes). Gradio pages (`gradio_prefixes`: /label, /admin) also need
'unsafe-eval': its HTML component compiles its Handlebars template with `new Function`. That
lets Gradio's own code evaluate strings; it still runs no inline script or event handler that
was not in the served page. JSON and text answers (errors included) get a policy that allows
nothing.

Client address: the peer's address, unless the peer is one of `PREFLOOP_TRUSTED_PROXIES`;
then the right-most X-Forwarded-For hop that is not a trusted proxy. Run uvicorn with
`UVICORN_OPTIONS` so that it does not rewrite the address itself from any local proxy.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
import secrets
from collections.abc import Iterable
from typing import Any

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# uvicorn's own proxy-header handling trusts X-Forwarded-For from 127.0.0.1 by default; the app
# resolves forwarded addresses itself (client_address), only from PREFLOOP_TRUSTED_PROXIES.
UVICORN_OPTIONS: dict[str, Any] = {"proxy_headers": False, "forwarded_allow_ips": ""}

PAGE_POLICY = ("default-src 'self'; script-src 'self' 'nonce-{nonce}'{hashes}{eval}; "
               "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
               "font-src 'self' data:; connect-src 'self'; media-src 'self' data: blob:; "
               "worker-src 'self' blob:; object-src 'none'; base-uri 'self'; "
               "form-action 'self'; frame-ancestors 'none'")
DATA_POLICY = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
SCRIPT_TAG = re.compile(rb"<script(?=[\s>])", re.IGNORECASE)
# Gradio endpoints the labeling UI and the admin view do not use: uploads (files without
# limit on disk), monitoring (event analytics of every user), file and proxy serving, the
# vibe editor, run history, Gradio's own login/token (prefloop's /login is the one way in).
GRADIO_OFF = ("/monitoring", "/login", "/gradio_api/upload", "/gradio_api/process_recording",
              "/gradio_api/vibe-", "/gradio_api/undo-vibe-edit", "/gradio_api/file=",
              "/gradio_api/file/", "/gradio_api/proxy=", "/gradio_api/run-history",
              "/gradio_api/runs", "/gradio_api/dev/", "/gradio_api/token", "/gradio_api/mcp",
              "/gradio_api/stream/", "/gradio_api/custom_component/", "/file=", "/proxy=")
GRADIO_LOGOUT = "/logout"


def script_hash(source: str) -> str:
    """The CSP source that allows an inline script with exactly this text."""
    digest = hashlib.sha256(source.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


def gradio_path_off(rest: str) -> bool:
    """Whether a path inside a Gradio mount (`rest`, e.g. "/monitoring/summary") is off."""
    return rest.startswith(GRADIO_OFF)


class ContentSecurityPolicy:
    """Sets Content-Security-Policy on every HTML, JSON and text response; HTML bodies get a
    fresh nonce on each server-written `<script>` tag."""

    def __init__(self, app: ASGIApp, script_hashes: Iterable[str] = (),
                 gradio_prefixes: tuple[str, ...] = ()):
        # A live view: the labeling UI adds its hashes when it is mounted.
        self.app, self.script_hashes, self.gradio_prefixes = app, script_hashes, gradio_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        nonce = secrets.token_urlsafe(18)
        gradio = bool(self.gradio_prefixes) and scope.get("path", "").startswith(
            self.gradio_prefixes)
        start: Message | None = None
        chunks: list[bytes] = []

        async def send_with_policy(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                kind = next((v for k, v in headers if k.lower() == b"content-type"), b"")
                if kind.startswith(b"text/html"):
                    start = message  # held until the body is complete
                    return
                if kind.startswith((b"application/json", b"text/plain", b"application/problem")):
                    headers.append((b"content-security-policy", DATA_POLICY.encode()))
                message["headers"] = headers
                await send(message)
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = SCRIPT_TAG.sub(f'<script nonce="{nonce}"'.encode(), b"".join(chunks))
            # Gradio's extra scripts and eval only on Gradio's pages, not on /login.
            hashes = "".join(f" {h}" for h in self.script_hashes) if gradio else ""
            policy = PAGE_POLICY.format(nonce=nonce, hashes=hashes,
                                        eval=" 'unsafe-eval'" if gradio else "")
            headers = [(k, v) for k, v in start.get("headers", [])
                       if k.lower() not in (b"content-length", b"content-security-policy")]
            headers += [(b"content-length", str(len(body)).encode()),
                        (b"content-security-policy", policy.encode())]
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, send_with_policy)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(value: str) -> tuple[Network, ...]:
    """"10.0.0.1, 172.16.0.0/12" -> the networks (ValueError naming a bad entry)."""
    networks: list[Network] = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or network") from None
    return tuple(networks)


def _trusted(address: str, networks: Iterable[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_address(connection: HTTPConnection, trusted: Iterable[Network] = ()) -> str:
    """The client's address: the peer, or behind trusted proxies the right-most
    X-Forwarded-For hop that is not one of them (hops further left are the client's word)."""
    peer = connection.client.host if connection.client else "unknown"
    networks = tuple(trusted)
    if not networks or not _trusted(peer, networks):
        return peer
    hops = [hop.strip() for header in connection.headers.getlist("x-forwarded-for")
            for hop in header.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, networks):
            return hop
    return hops[0] if hops else peer
