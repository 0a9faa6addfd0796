"""Every error the server answers with, mapped to a status code in one place.

Bodies follow OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, so the openai SDK
raises the matching exception class; the tutorial's POST / adds its own keys, and Ollama's routes
answer Ollama's shape, `{"error": "message"}`, which its clients read. A 500 never carries a
traceback: the details go to the server log only.
"""

from __future__ import annotations

import contextvars
import datetime
import difflib
import logging
import typing
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from minicpm_server.api.protocol import UNSUPPORTED, InvalidRequest
from minicpm_server.engine.grammar import ConstraintError
from minicpm_server.engine.protocol import ContextOverflowError, EngineError, EngineUnavailableError, QueueFullError

log = logging.getLogger("minicpm_server")

# The request being served, set by RequestIdMiddleware for everything the request runs (its route,
# its stream, its error handlers), so every error body can name it without passing it around.
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    """A failure with a known status; raise it from routes and it becomes the JSON error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; its request was cancelled."""


def error_response(error: APIError, scope: Scope | None = None) -> JSONResponse:
    """The JSON error body; on the tutorial's POST / it also carries that endpoint's own keys
    (`response` null, `status`, `time`), so the tutorial's client reads a failure instead of
    dying on a missing key; under Ollama's /api it is Ollama's `{"error": "message"}`."""
    request_id = request_id_var.get()
    if scope is not None and is_ollama(scope):
        body: dict[str, Any] = {"error": error.message}
        if request_id:
            body["request_id"] = request_id
        return JSONResponse(body, status_code=error.status, headers=error.headers)
    body = {
        "error": {
            "message": error.message,
            "type": _TYPES.get(error.status, "invalid_request_error" if error.status < 500 else "server_error"),
            "param": error.param,
            "code": error.code,
        }
    }
    if request_id:
        body["error"]["request_id"] = request_id
    if scope is not None and is_legacy_chat(scope):
        body.update(response=None, status=error.status, time=datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"))
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def is_legacy_chat(scope: Scope) -> bool:
    """A route of the tutorial's (POST /). Middlewares run before routing, so this looks the
    method and path up in what create_app recorded from the tutorial's router."""
    found = _app_state(scope, "tutorial_endpoints") or frozenset()
    return (scope.get("method"), scope.get("path")) in found


def is_ollama(scope: Scope) -> bool:
    """A path under the prefix of Ollama's router (create_app records it): its routes, and the
    paths and methods it lacks, so an Ollama client reads every error there."""
    prefix = _app_state(scope, "ollama_prefix")
    path = scope.get("path", "")
    return bool(prefix) and (path == prefix or path.startswith(prefix + "/"))


def _app_state(scope: Scope, name: str) -> Any:
    app = scope.get("app")
    if scope.get("type") != "http" or app is None:
        return None
    return getattr(app.state, name, None)


def endpoints_of(router: Any) -> frozenset[tuple[str, str]]:
    """(method, path) of every route a router declares."""
    return frozenset(
        (method, route.path) for route in router.routes for method in getattr(route, "methods", None) or ()
    )


def body_model(scope: Scope) -> type[BaseModel] | None:
    """The pydantic model of the matched route's JSON body, if it has one."""
    field = getattr(scope.get("route"), "body_field", None)
    annotation = getattr(getattr(field, "field_info", None), "annotation", None)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def as_api_error(exc: Exception) -> APIError | None:
    """The APIError for an engine exception, or None when it is not one we know."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextOverflowError):
        return APIError(400, str(exc), param=exc.field, code="context_length_exceeded")
    if isinstance(exc, InvalidRequest):
        return APIError(400, str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, ConstraintError):
        return APIError(400, str(exc), param=exc.param, code="invalid_constraint")
    if isinstance(exc, QueueFullError):
        return APIError(429, f"server busy: {exc}; retry shortly", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(exc, EngineUnavailableError):
        return APIError(503, str(exc), code="unavailable", headers={"Retry-After": "5"})
    if isinstance(exc, EngineError):
        return APIError(503, str(exc), code="engine_error", headers={"Retry-After": "1"})
    return None


def describe_validation_error(exc: RequestValidationError, request: Request) -> APIError:
    """One readable sentence naming the first bad field; never echoes the input back."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": ""}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, "request body is not valid JSON", code="invalid_json")
    content_type = request.headers.get("content-type", "")
    if field is None and "json" not in content_type.lower():
        return APIError(
            400, "request body must be a JSON object sent with 'Content-Type: application/json'", code="invalid_body"
        )
    if kind == "extra_forbidden":
        return APIError(400, f"unknown field '{field}'{_did_you_mean(loc, request)}", param=field, code="unknown_field")
    if kind == UNSUPPORTED:  # a model_validator in protocol.py: the context names the field
        param = str(first.get("ctx", {}).get("param", field))
        return APIError(400, str(first.get("msg")), param=param, code=UNSUPPORTED)
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    where = f"field '{field}'" if field else "request body"
    return APIError(400, f"{where}: {message}{more}", param=field, code="invalid_value")


def _did_you_mean(loc: list[str], request: Request) -> str:
    """A hint naming the field the client probably meant, among the fields of the model the unknown
    one was found in: the endpoint's body, or an object inside it (Ollama's `options`, a message)."""
    model = _model_at(body_model(request.scope), loc[:-1])
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.6) if model else []
    return f"; did you mean '{close[0]}'?" if close else ""


def _model_at(model: type[BaseModel] | None, path: list[str]) -> type[BaseModel] | None:
    """The model reached from `model` through the fields named in `path` (list indices skipped)."""
    for part in path:
        if model is None:
            return None
        if part.isdigit():
            continue  # an item of a list: the list field already led to the item's model
        field = model.model_fields.get(part)
        model = _model_in(field.annotation) if field is not None else None
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `X | None` or `list[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(describe_validation_error(exc, request), request.scope)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 400 and "parsing the body" in message:
            message = "request body could not be parsed: it must be UTF-8 encoded JSON"
        elif exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(APIError(exc.status_code, message, headers=getattr(exc, "headers", None)), request.scope)

    async def _known(request: Request, exc: Exception) -> JSONResponse:
        known = as_api_error(exc)
        assert known is not None
        return error_response(known, request.scope)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> JSONResponse:
        # Nobody reads this answer; 499 ("client closed request") makes the log line say what happened.
        return JSONResponse({"error": {"message": "client disconnected", "type": "cancelled"}}, status_code=499)

    known = (APIError, InvalidRequest, ConstraintError, ContextOverflowError, QueueFullError, EngineUnavailableError)
    for cls in (*known, EngineError):
        app.add_exception_handler(cls, _known)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        error = APIError(500, "internal server error; see the server log", code="internal_error")
        return error_response(error, request.scope)


def error_payload(exc: Exception) -> dict[str, Any]:
    """The error body for a failure that happens after a stream has started."""
    known = as_api_error(exc) or APIError(500, "internal server error; see the server log", code="internal_error")
    payload = {"message": known.message, "type": _TYPES.get(known.status, "server_error"), "code": known.code}
    request_id = request_id_var.get()
    return payload if request_id is None else {**payload, "request_id": request_id}
