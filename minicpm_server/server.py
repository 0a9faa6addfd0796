"""The FastAPI application: app factory, model lifecycle, routes, auth and the request log.

The model loads on a background thread after the server starts listening, so `/health`
answers 503 ("loading") until the engine is ready and 200 after; generation routes answer 503
with Retry-After meanwhile. Nothing that runs the model ever runs on the event loop.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from minicpm_server.checkpoint import LoadedCheckpoint, StartupError, load_checkpoint
from minicpm_server.engine import Engine
from minicpm_server.errors import APIError, error_response, install_error_handlers
from minicpm_server.metrics import Metrics
from minicpm_server.protocol import (
    DEFAULT_REPETITION_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    FaultRequest,
    HealthResponse,
    LegacyChatRequest,
    LegacyChatResponse,
    ModelCard,
    ModelList,
    OpenAIFields,
    error_responses,
)
from minicpm_server.serving import (
    TrackedGeneration,
    legacy_stream,
    now_string,
    openai_answer,
    openai_stream,
    prepare_chat_completion,
    prepare_completion,
    prepare_legacy,
    prepare_off_loop,
)
from minicpm_server.settings import Settings

# Headers that keep proxies (nginx, AutoDL's port mapping) from buffering a stream.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

log = logging.getLogger("minicpm_server")


class ModelService:
    """Owns the checkpoint and the engine for the app's lifetime."""

    def __init__(self, settings: Settings, metrics: Metrics, on_fatal: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.on_fatal = on_fatal
        self.created = int(time.time())
        self.state = "loading"
        self.detail: str | None = None
        self.checkpoint: LoadedCheckpoint | None = None
        self.engine: Engine | None = None
        self.draining = False

    def start_loading(self) -> None:
        threading.Thread(target=self._load, name="minicpm-loader", daemon=True).start()

    def _load(self) -> None:
        s = self.settings
        try:
            checkpoint = load_checkpoint(s.model_path, s.device, s.dtype)
            engine = Engine(
                checkpoint.model,
                checkpoint.tokenizer,
                context_window=checkpoint.context_window,
                eos_token_id=checkpoint.eos_token_id,
                max_batch=s.max_batch,
                max_queue=s.max_queue,
                max_prefill_tokens=s.max_prefill_tokens,
                empty_cache=s.empty_cache,
                seed=s.seed,
            )
            engine.start()
            self.metrics.watch_engine(lambda: engine.num_running, lambda: engine.num_waiting, lambda: engine.stats)
        except StartupError as exc:
            self._fail(str(exc))
            return
        except Exception as exc:
            self._fail(
                f"loading the model failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
            return
        self.checkpoint, self.engine, self.state = checkpoint, engine, "ready"
        log.info("ready: %s (context window %d tokens)", s.model_name, checkpoint.context_window)

    def _fail(self, message: str) -> None:
        self.state, self.detail = "failed", message
        log.error("%s", message)
        if self.on_fatal is not None:
            self.on_fatal(message)

    def health(self) -> tuple[int, HealthResponse]:
        engine = self.engine
        running, waiting = (engine.num_running, engine.num_waiting) if engine is not None else (0, 0)
        if self.draining:
            detail = "the server is shutting down"
            return 503, HealthResponse(status="shutting_down", detail=detail, running=running, waiting=waiting)
        if self.state == "ready" and engine is not None and engine.alive:
            return 200, HealthResponse(status="ok", model=self.settings.model_name, running=running, waiting=waiting)
        if self.state == "loading":
            return 503, HealthResponse(status="loading", detail="the model is loading")
        detail = self.detail or "the generation engine has stopped"
        return 503, HealthResponse(status="unavailable", detail=detail)

    def require_engine(self) -> Engine:
        engine = self.engine
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down", headers={"Retry-After": "5"})
        if self.state == "loading":
            raise APIError(
                503, "the model is still loading; retry shortly", code="loading", headers={"Retry-After": "5"}
            )
        if engine is None or not engine.alive:
            raise APIError(503, self.detail or "the generation engine is not running", code="unavailable")
        return engine

    def busy(self) -> bool:
        return self.engine is not None and self.engine.busy

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()

    def drain(self, timeout: float) -> None:
        """Refuse new work, give in-flight requests `timeout` seconds, then fail what is left (503)."""
        self.draining = True
        deadline = time.monotonic() + timeout
        log.info("shutting down: waiting up to %g s for in-flight requests", timeout)
        while self.busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.busy():
            log.warning("shutdown timeout reached: cancelling the requests still in flight")
        self.stop()


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains in-flight requests before exiting; a second one forces."""

    def __init__(self, config: uvicorn.Config, service: ModelService, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.service = service
        self.shutdown_timeout = shutdown_timeout

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.service.draining:
            super().handle_exit(sig, frame)
            return
        threading.Thread(target=self._drain_then_exit, name="minicpm-drain", daemon=True).start()

    def _drain_then_exit(self) -> None:
        self.service.drain(self.shutdown_timeout)
        self.should_exit = True


# --------------------------------------------------------------------------- request log


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
            self._log(scope, status, time.perf_counter() - start)
            self.metrics.observe_request(scope.get("path", ""), status)

    def _log(self, scope: Scope, status: int, seconds: float) -> None:
        state = scope.get("state") or {}
        prompt_tokens, completion_tokens = state.get("usage", (0, 0))
        line = (
            f"{scope.get('method', '-')} {scope.get('path', '-')} status={status} "
            f"prompt_tokens={prompt_tokens} completion_tokens={completion_tokens} duration={seconds:.3f}s"
        )
        if self.log_prompts and "texts" in state:
            prompt, answer = state["texts"]
            line += f" prompt={prompt!r} response={answer!r}"
        log.info("%s", line)


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
        await error_response(error)(scope, receive, send)


# --------------------------------------------------------------------------- auth


def api_key_guard(settings: Settings) -> Callable[[Request], None]:
    expected = (settings.api_key or "").encode()

    def require_api_key(request: Request) -> None:
        if not expected:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        # compare_digest: the time taken does not reveal how much of the key matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise APIError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return require_api_key


# --------------------------------------------------------------------------- routes


def _service(request: Request) -> ModelService:
    return request.app.state.service


def legacy_routes() -> APIRouter:
    router = APIRouter()

    @router.post(
        "/",
        response_model=LegacyChatResponse,
        responses={200: {"content": {"application/x-ndjson": {}}}, **error_responses(400, 401, 413, 429, 503, 504)},
        summary="The tutorial's chat endpoint",
    )
    async def legacy_chat(body: LegacyChatRequest, request: Request) -> Any:
        _, gen = await _start_generation(request, prepare_legacy, body)
        if body.stream:
            return StreamingResponse(legacy_stream(gen), media_type="application/x-ndjson", headers=STREAM_HEADERS)
        completion = await gen.complete()
        return {"response": completion.text, "status": 200, "time": now_string()}

    return router


async def _start_generation(request: Request, prepare: Any, body: Any) -> tuple[ModelService, TrackedGeneration]:
    """Validate against the engine, render and tokenize off the event loop, and submit."""
    service = _service(request)
    engine = service.require_engine()
    prepared = await prepare_off_loop(prepare, engine, body)
    gen = TrackedGeneration.submit(engine, prepared, request, service.metrics, service.settings.request_timeout)
    return service, gen


async def _openai_generation(request: Request, body: OpenAIFields, prepare: Any, kind: str) -> Any:
    service, gen = await _start_generation(request, prepare, body)
    model = service.settings.model_name
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = openai_stream(gen, kind=kind, model=model, include_usage=include_usage)
        return StreamingResponse(stream, media_type="text/event-stream", headers=STREAM_HEADERS)
    return openai_answer(kind, await gen.complete(), model)


def openai_routes() -> APIRouter:
    router = APIRouter(prefix="/v1")
    errors = {200: {"content": {"text/event-stream": {}}}, **error_responses(400, 401, 413, 429, 503, 504)}

    @router.get("/models", response_model=ModelList, responses=error_responses(401))
    async def list_models(request: Request) -> Any:
        service = _service(request)
        return ModelList(data=[ModelCard(id=service.settings.model_name, created=service.created)])

    @router.post("/chat/completions", response_model=ChatCompletionResponse, responses=errors)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await _openai_generation(request, body, prepare_chat_completion, "chat")

    @router.post("/completions", response_model=CompletionResponse, responses=errors)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await _openai_generation(request, body, prepare_completion, "completion")

    return router


def fault_routes() -> APIRouter:
    """Testing only (--testing-fault-injection): make the engine fail the way a GPU can."""
    router = APIRouter()

    @router.post("/debug/fault", status_code=202, responses=error_responses(400, 401, 503))
    async def inject_fault(body: FaultRequest, request: Request) -> dict[str, str]:
        engine = _service(request).require_engine()
        if body.kind == "oom":
            engine.inject_fault(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)"))
        else:
            engine.inject_fault(EngineKilled("injected fatal fault"))
        return {"status": "armed", "kind": body.kind}

    return router


class EngineKilled(BaseException):
    """Escapes the engine's per-step error handling, so its thread dies (tests of a dead engine)."""


def metrics_routes() -> APIRouter:
    router = APIRouter()

    @router.get(
        "/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}, **error_responses(401)}
    )
    async def metrics(request: Request) -> Response:
        registry = _service(request).metrics
        return Response(registry.render(), media_type=registry.content_type)

    return router


STATIC_DIR = Path(__file__).parent / "static"
# The page loads only its own files: no inline script, no other origin (no CDN), no framing.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def ui_routes() -> APIRouter:
    """The chat page (GET / from a browser) and what it needs to know; no API key needed for these."""
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    async def chat_page(request: Request) -> Response:
        if "text/html" not in request.headers.get("accept", ""):
            raise APIError(405, "GET / serves the chat page to browsers; send questions with POST / (JSON)")
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)

    @router.get("/ui/config")
    async def ui_config(request: Request) -> dict[str, Any]:
        service = _service(request)
        checkpoint = service.checkpoint
        return {
            "model": service.settings.model_name,
            "context_window": checkpoint.context_window if checkpoint else None,
            "auth_required": bool(service.settings.api_key),
            "defaults": {
                "temperature": DEFAULT_TEMPERATURE,
                "top_p": DEFAULT_TOP_P,
                "repetition_penalty": DEFAULT_REPETITION_PENALTY,
            },
        }

    return router


def health_routes() -> APIRouter:
    router = APIRouter()

    @router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def health(request: Request) -> JSONResponse:
        status, body = _service(request).health()
        return JSONResponse(body.model_dump(exclude_none=True), status_code=status)

    return router


# --------------------------------------------------------------------------- the app


def create_app(settings: Settings, on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    metrics = Metrics()
    service = ModelService(settings, metrics, on_fatal)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        torch.manual_seed(settings.seed)
        if settings.public_interface and not settings.api_key:
            log.warning(
                "listening on %s without an API key: anyone who can reach port %d can use the model; "
                "set --api-key (or MINICPM_API_KEY)",
                settings.host,
                settings.port,
            )
        service.start_loading()
        yield
        service.stop()

    app = FastAPI(title="MiniCPM API server", version="0.1.0", lifespan=lifespan)
    app.state.service = service
    install_error_handlers(app)
    guarded = [Depends(api_key_guard(settings))]
    app.include_router(health_routes())
    app.include_router(ui_routes())
    app.mount("/ui", StaticFiles(directory=STATIC_DIR), name="ui")
    app.include_router(legacy_routes(), dependencies=guarded)
    app.include_router(openai_routes(), dependencies=guarded)
    app.include_router(metrics_routes(), dependencies=guarded)
    if settings.testing_fault_injection:
        log.warning("fault injection is enabled (POST /debug/fault): for tests only")
        app.include_router(fault_routes(), dependencies=guarded)
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestLogMiddleware, metrics=metrics, log_prompts=settings.log_prompts)
    return app
