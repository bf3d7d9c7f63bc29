"""Every error leaves the API as `{"error": {"code", "message"}}` with a 4xx status for bad input.

The service raises `loragen.errors` kinds; `DOMAIN_STATUS` is the one place that gives each its
HTTP status and code (any other `LoragenError` is a 400)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from ..errors import (ConflictError, DeadlineExceeded, InvalidAdapterError, LimitExceeded, LoragenError,
                      NotFoundError, NotReadyError, OverBudget, Overloaded, ReadOnlyError, UnavailableError,
                      UnknownMethodError)

log = logging.getLogger(__name__)

HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 406: "not_acceptable", 409: "conflict", 413: "payload_too_large",
              415: "unsupported_media_type", 422: "invalid_request", 429: "overloaded", 503: "not_ready",
              504: "deadline_exceeded"}


DOMAIN_STATUS: dict[type[LoragenError], tuple[int, str]] = {
    UnknownMethodError: (400, "unknown_method"),
    NotFoundError: (404, "not_found"),
    ConflictError: (409, "conflict"),
    ReadOnlyError: (405, "read_only"),
    NotReadyError: (503, "not_ready"),
    UnavailableError: (503, "base_model_unavailable"),
    InvalidAdapterError: (400, "invalid_adapter"),
    DeadlineExceeded: (504, "deadline_exceeded"),
}


def domain_status(exc: LoragenError) -> tuple[int, str]:
    """The status and code of a service error: its nearest kind in `DOMAIN_STATUS`, else 400."""
    for kind in type(exc).__mro__:
        if kind in DOMAIN_STATUS:
            return DOMAIN_STATUS[kind]
    return 400, "bad_request"


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _location(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"] or ["body"]
    return ".".join(parts)


def describe_validation(exc: RequestValidationError) -> tuple[int, str, str]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return 400, "invalid_json", f"the request body is not valid JSON ({detail}); send a JSON object"
    messages = []
    for e in errors[:5]:
        msg = str(e.get("msg", "invalid"))
        if e.get("type") == "missing":
            msg = "this field is required"
        messages.append(f"{_location(tuple(e.get('loc', ())))}: {msg}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return 422, "invalid_request", "; ".join(messages) + more


def allowed_methods(request: Request) -> str:
    """The `Allow` header of a 405: every method some route serves at the request's path (the
    router names only the first matching route's, e.g. GET where GET and POST are served)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


def install(app: FastAPI, on_refused: Callable[[str], None] = lambda reason: None) -> None:
    """`on_refused(reason)` counts the requests a cost limit or the memory budget refused."""

    async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(*describe_validation(exc))

    async def on_loragen(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, LoragenError)
        retry = {"Retry-After": str(exc.retry_after)} if isinstance(exc, NotReadyError) else None
        return error_response(*domain_status(exc), str(exc), retry)

    async def on_limit(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, LimitExceeded)
        if isinstance(exc, OverBudget):
            on_refused("memory_budget")
            return error_response(413, "over_memory_budget", str(exc))
        on_refused("cost_limit")
        return error_response(422, "limit_exceeded", str(exc))

    async def on_overloaded(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Overloaded)
        status = 503 if exc.reason == "not_ready" else 429
        code = {"not_ready": "not_ready", "rate_limited": "rate_limited"}.get(exc.reason, "overloaded")
        return error_response(status, code, str(exc), {"Retry-After": str(max(1, math.ceil(exc.retry_after)))})

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = allowed_methods(request) or headers.get("Allow", "")
            message = f"{request.method} is not allowed here; use {headers['Allow']}"
        return error_response(exc.status_code, HTTP_CODES.get(exc.status_code, "error"), message, headers or None)

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", "the server failed on this request; see its log")

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(LoragenError, on_loragen)
    app.add_exception_handler(LimitExceeded, on_limit)
    app.add_exception_handler(Overloaded, on_overloaded)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
