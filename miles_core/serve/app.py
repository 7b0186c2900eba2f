"""The `miles serve` FastAPI app: auth, body limits and error shapes around the SGLang-native and
OpenAI routes; `serve()` loads a model and runs it under uvicorn.

Security: with an api key every route but `/health` needs `Authorization: Bearer KEY`; the
weight-update and memory routes are refused without a key unless
`allow_unauthenticated_weight_updates`. Every error is JSON `{"error": {"message", "code"}}`
(SGLang's `ErrorBody`); nothing answers a traceback.
"""

from __future__ import annotations

import logging
import secrets

from fastapi import FastAPI, Request
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from miles_core.engine.native.engine import EngineReleased
from miles_core.serve import memory_routes, native_routes, openai_routes, readback_routes, weight_routes
from miles_core.serve.bodies import error_response
from miles_core.serve.state import RequestError, ServeState

logger = logging.getLogger("miles.serve")

PROTECTED_ROUTES = frozenset({
    "/update_weights_from_disk", "/update_weights_from_tensor",
    "/release_memory_occupation", "/resume_memory_occupation", "/get_weights_by_name",
}) | weight_routes.ROUTES
OPEN_ROUTES = frozenset({"/health"})


def create_app(state: ServeState) -> FastAPI:
    """The app over a ready `ServeState` (engine, worker, tokenizer, options)."""
    app = FastAPI(title="miles serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state
    app.include_router(native_routes.router)
    app.include_router(openai_routes.router)
    app.include_router(weight_routes.router)
    app.include_router(memory_routes.router)
    app.include_router(readback_routes.router)
    _add_guards(app, state)
    _add_error_handlers(app)
    return app


def _add_guards(app: FastAPI, state: ServeState) -> None:
    app.add_middleware(_Guard, options=state.options)


class _Guard:
    """Auth and body-size checks before any route, as a plain ASGI middleware: Starlette's
    `@app.middleware("http")` wraps every request in extra tasks and streams (~0.3 ms a call here),
    which the weight-sync control calls pay on every push."""

    def __init__(self, app, options) -> None:
        self.app, self.options = app, options

    async def __call__(self, scope, receive, send) -> None:
        refusal = self._refusal(scope) if scope["type"] == "http" else None
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            await error_response(*refusal)(scope, receive, send)

    def _refusal(self, scope) -> tuple[str, int] | None:
        options, path = self.options, scope["path"]
        headers = Headers(scope=scope)
        if path not in OPEN_ROUTES and options.api_key and not _authorized(headers, options.api_key):
            return "missing or wrong api key (Authorization: Bearer KEY)", 401
        if path in PROTECTED_ROUTES and not options.api_key and not options.allow_unauthenticated_weight_updates:
            return f"{path} needs --api-key (or --allow-unauthenticated-weight-updates)", 403
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > options.max_request_bytes:
            return f"request body of {length} bytes exceeds --max-request-bytes ({options.max_request_bytes})", 413
        return None


def _authorized(headers: Headers, key: str) -> bool:
    header = headers.get("authorization", "")
    return secrets.compare_digest(header.encode(), f"Bearer {key}".encode())


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def bad_request(request: Request, err: RequestError):
        return error_response(str(err), err.status)

    @app.exception_handler(EngineReleased)
    async def released(request: Request, err: EngineReleased):  # the caller's turn-taking, not a server failure
        return error_response(str(err), 409)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        return error_response(str(err.detail), err.status_code)

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception):
        logger.exception("miles serve: %s failed", request.url.path)
        return error_response(f"internal error ({type(err).__name__}): {err}", 500)
