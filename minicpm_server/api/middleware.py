"""ASGI middlewares: request ids, the request log (and request metrics), the body size limit, and
the missing Content-Type of the tutorial's and Ollama's clients."""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from minicpm_server.api.errors import APIError, error_response, is_legacy_chat, is_ollama, request_id_var
from minicpm_server.api.metrics import Metrics

log = logging.getLogger("minicpm_server")


# A client's own id is kept when it is short and printable (what proxies and SDKs send: UUIDs,
# hex, "req_..."); anything else is replaced, so a log line cannot be forged or flooded through it.
_CLIENT_REQUEST_ID = re.compile(r"[!-~]{1,128}")


def request_id_from(scope: Scope) -> str:
    """The request's id: the client's X-Request-Id when acceptable, else a new one."""
    given = dict(scope.get("headers") or ()).get(b"x-request-id", b"").decode("latin-1")
    return given if _CLIENT_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


class RequestIdMiddleware:
    """Gives every request an id: in `X-Request-Id` on the answer, in its log line, in error bodies."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        request_id_var.set(request_id)  # each request runs in a context of its own (uvicorn's task)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", request_id.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_id)


class RequestLogMiddleware:
    """One line per request: endpoint, status, token counts, duration; texts only with --log-prompts."""

    def __init__(self, app: ASGIApp, metrics: Metrics, log_prompts: bool = False) -> None:
        self.app = app
        self.metrics = metrics
        self.log_prompts = log_prompts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        scope.setdefault("state", {})["started"] = start  # time to first token counts from here
        status = 500

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            if scope["state"].get("read_timeout"):
                status = 408  # what the connection layer answered (connections.py); the app's answer was dropped
            self._log(scope, status, time.perf_counter() - start)
            route = scope.get("route")  # set by the router when a route matched
            self.metrics.observe_request(getattr(route, "path", None), status)

    def _log(self, scope: Scope, status: int, seconds: float) -> None:
        """Generations and failures at info; health probes, metrics scrapes and page files at debug."""
        state = scope.get("state") or {}
        line = f"{scope.get('method', '-')} {scope.get('path', '-')} status={status}"
        if state.get("cancelled"):
            line += " cancelled"
        if "usage" in state:  # only requests that reached the engine have token counts
            prompt_tokens, completion_tokens = state["usage"]
            line += f" prompt_tokens={prompt_tokens} completion_tokens={completion_tokens}"
        line += f" duration={seconds:.3f}s"
        if "request_id" in state:
            line += f" request_id={state['request_id']}"
        if self.log_prompts and "texts" in state:
            prompt, answer = state["texts"]
            line += f" prompt={prompt!r} response={answer!r}"
        probe = scope.get("path") == "/health"  # load balancers poll it every few seconds
        level = logging.INFO if "usage" in state or (status >= 400 and not probe) else logging.DEBUG
        log.log(level, "%s", line)


class BodyLimitMiddleware:
    """413 with a JSON error for bodies over the limit, declared (Content-Length) or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        seen = 0
        too_large = False
        answered = False

        async def counting_receive() -> Message:
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    too_large = True
                    return {"type": "http.disconnect"}  # the app stops reading; we answer below
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal answered
            if too_large:
                if not answered:
                    answered = True
                    await self._refuse(scope, receive, send)
                return
            await send(message)

        await self.app(scope, counting_receive, guarded_send)
        if too_large and not answered:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = APIError(
            413, f"request body is larger than {self.max_bytes} bytes (--max-body-bytes)", code="body_too_large"
        )
        await error_response(error, scope)(scope, receive, send)


# --------------------------------------------------------------------------- the tutorial's and Ollama's clients


class LenientJsonBodyMiddleware:
    """POST / and Ollama's /api routes read their body as JSON even without `Content-Type: application/json`.

    The tutorial's server did, and its clients rely on it: `requests.post(url, data=json.dumps(...))`
    sends no Content-Type, `curl -d '{...}'` sends form encoding. Ollama reads any body as JSON, and
    its documentation's curl examples send none. A body that is not JSON still gets "not valid
    JSON" (400). The /v1 routes keep FastAPI's rule, which refuses such bodies.
    """

    LENIENT = (b"", b"application/x-www-form-urlencoded")

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if is_legacy_chat(scope) or is_ollama(scope):
            headers = [(k, v) for k, v in scope.get("headers") or () if k != b"content-type"]
            given = dict(scope.get("headers") or ()).get(b"content-type", b"")
            if given.split(b";")[0].strip().lower() in self.LENIENT:
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)
