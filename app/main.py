"""The prefloop web service: `create_app(settings)` builds the FastAPI app.

One process serves the REST API (/api), the login page (/login), /healthz, the OpenAPI schema
(/openapi.json) and the deployed policy through an OpenAI-compatible endpoint (/v1,
app/routes/openai_api.py, following the store's deployed version with app/deploy.py). The
labeling UI (/label) and the admin view (/admin) are Gradio apps mounted by the caller through
`ui=` (labeling.ui.mount_labeling_ui), so the service never imports the UI built on top of it.
Nothing is built at import; `prefloop up` (loop/commands.py) opens the store and runs
`create_app(settings, db=db, ui=mount_labeling_ui)` under uvicorn:

    prefloop users add ana --role admin       # prints ana's API token
    prefloop up --port 8000                   # then open http://127.0.0.1:8000/label/
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, RedirectResponse
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.auth import SESSION_COOKIE, end_session, user_from_request
from app.errors import error_body, install_error_handlers
from app.ratelimit import FailureWindow, TokenBucket
from app.schemas import Health
from app.settings import Settings, get_settings
from app.web_security import GRADIO_LOGOUT, ContentSecurityPolicy, gradio_path_off
from store import __version__
from store.db import Database
from store.errors import StoreError

GRADIO_MOUNTS = ("/label", "/admin")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
]


class BodyLimit:
    """413 for request bodies over `limit` bytes, by Content-Length or by counting the stream
    (Starlette has no body limit of its own)."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await _send_json(send, scope, 413, f"request body over {self.limit} bytes")
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _send_json(send, scope, 413, f"request body over {self.limit} bytes")


class _TooLarge(Exception):
    pass


async def _send_json(send: Send, scope: Scope, status: int, detail: str) -> None:
    body = error_body(scope.get("path", ""), status, detail)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class RequestContext:
    """A request id per request (echoed as X-Request-ID, recorded in the audit trail) and
    security headers on every response."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                present = {name.lower() for name, _ in headers}
                headers += [h for h in SECURITY_HEADERS if h[0] not in present]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


class AreaGate:
    """Everything under /label needs a logged-in account and /admin an admin, checked before
    Gradio sees the request (some Gradio endpoints do not check auth themselves); the Gradio
    endpoints the UI does not use (uploads, monitoring, ...: web_security.GRADIO_OFF) are 404
    for everyone, and Gradio's logout ends the prefloop session. Other paths pass through."""

    def __init__(self, app: ASGIApp, db: Database):
        self.app, self.db = app, db

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        area = "admin" if path.startswith("/admin") else "label" if path.startswith(
            "/label") else None
        if scope["type"] not in ("http", "websocket") or area is None:
            await self.app(scope, receive, send)
            return
        connection = HTTPConnection(scope)
        rest = path[len(area) + 1:]
        if rest == GRADIO_LOGOUT and scope["type"] == "http":
            # Gradio's own logout only forgets Gradio's cookies: end the prefloop session.
            from app.routes.pages import logged_out

            await run_in_threadpool(end_session, self.db, connection.cookies.get(
                SESSION_COOKIE))
            await logged_out()(scope, receive, send)
            return
        user = await run_in_threadpool(user_from_request, connection, self.db)
        response: Any = None
        if user is None:
            wants_page = scope.get("method") == "GET" and "text/html" in connection.headers.get(
                "accept", "")
            response = (RedirectResponse(f"/login?next=/{area}/", status_code=303) if wants_page
                        else JSONResponse({"detail": "not authenticated"}, status_code=401))
        elif area == "admin" and not user.is_admin:
            response = JSONResponse({"detail": "this needs an admin account"}, status_code=403)
        elif gradio_path_off(rest):
            response = JSONResponse({"detail": "not available here"}, status_code=404)
        if response is not None:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            else:
                await response(scope, receive, send)
            return
        scope.setdefault("state", {})["user"] = user
        await self.app(scope, receive, send)


def create_app(settings: Settings | None = None, *, db: Database | None = None,
               ui: Callable[[FastAPI], None] | None = None) -> FastAPI:
    """The app for these settings; `db` is the store to use (built from settings if absent,
    and then disposed of at shutdown). `ui`, when given, is called with the app once the
    routes are in (labeling.ui.mount_labeling_ui mounts /label and /admin); it reads the
    store, settings and submit limiter from `app.state`."""
    settings = settings or get_settings()
    owns_db = db is None
    store = db or Database.from_url(settings.resolved_db_url(),
                                    sqlite_synchronous=settings.sqlite_synchronous)

    deployments = None
    if settings.serving != "off":
        from app.deploy import DeploymentManager

        # Follows the deployed policy version in the store (loads nothing until one exists).
        deployments = DeploymentManager(store, settings)

    @asynccontextmanager
    async def lifespan(app_: FastAPI) -> AsyncIterator[None]:
        # Read from app.state, so a test may put its own manager there before startup.
        manager = app_.state.deployments
        if manager is not None:
            manager.start()
        yield
        if manager is not None:
            await run_in_threadpool(manager.stop)
        if owns_db:
            store.dispose()

    # No /docs or /redoc: FastAPI's pages load Swagger UI / ReDoc from a CDN and no installed
    # package ships those assets; the schema stays at /openapi.json.
    app = FastAPI(title="prefloop", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None,
                  description="Preference labeling service: tasks, labels, accounts, and the "
                  "deployed policy at /v1 (OpenAI-compatible).")
    app.state.settings = settings
    app.state.db = store
    app.state.deployments = deployments
    app.state.submit_limiter = TokenBucket(settings.submit_rate_per_s, settings.submit_burst)
    app.state.login_limiter = FailureWindow(settings.login_attempts, settings.login_window_s)
    app.state.address_limiter = FailureWindow(settings.login_attempts_per_address,
                                              settings.login_window_s)
    # Inline scripts the UI adds (their CSP hashes); mount_labeling_ui appends its own.
    app.state.csp_script_hashes = script_hashes = list[str]()

    install_error_handlers(app)

    @app.exception_handler(StoreError)
    async def store_error(_request: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status_code)

    @app.exception_handler(OperationalError)
    async def busy(_request: Request, exc: OperationalError) -> JSONResponse:
        # Contention that outlasted the retries: tell the client to retry, do not 500.
        if "locked" not in str(exc).lower():
            raise exc
        return JSONResponse({"detail": "the store is busy, retry"}, status_code=503,
                            headers={"Retry-After": "1"})

    @app.get("/healthz", response_model=Health, tags=["ops"])
    def healthz() -> Health:
        """Liveness and readiness: the store answers a query."""
        with store.read() as session:
            session.exec(text("select 1"))  # type: ignore[call-overload]
        return Health(status="ok", database=store.engine.dialect.name)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/label/", status_code=307)

    from app.routes import api, openai_api, pages

    app.include_router(api.router)
    app.include_router(pages.router)
    app.include_router(openai_api.router)
    app.add_middleware(AreaGate, db=store)
    if ui is not None:
        ui(app)
    # A CORS policy of the app's own (no other origin, no credentials): without one, Gradio
    # adds its own, which reflects any Origin with credentials when the host is not local.
    app.add_middleware(CORSMiddleware, allow_origins=[], allow_credentials=False)
    app.add_middleware(ContentSecurityPolicy, script_hashes=script_hashes,
                       gradio_prefixes=GRADIO_MOUNTS)
    app.add_middleware(RequestContext)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app

