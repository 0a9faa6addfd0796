"""The FastAPI application: the app factory and the routes, nothing else.

Routes validate (pydantic models in protocol.py), hand the body to generation.py, and answer
with a formatter from responses.py. The model's lifecycle is service.py's, the middlewares are
middleware.py's, errors are mapped in errors.py. Nothing that runs the model runs on the event loop.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from minicpm_server.api import generation, ollama_responses
from minicpm_server.api.errors import APIError, endpoints_of, install_error_handlers
from minicpm_server.api.metrics import Metrics
from minicpm_server.api.middleware import (
    BodyLimitMiddleware,
    LenientJsonBodyMiddleware,
    RequestIdMiddleware,
    RequestLogMiddleware,
)
from minicpm_server.api.ollama_protocol import (
    OLLAMA_API_VERSION,
    OllamaChatRequest,
    OllamaChatResponse,
    OllamaError,
    OllamaGenerateRequest,
    OllamaGenerateResponse,
    OllamaGeneration,
    OllamaShowRequest,
    PsResponse,
    ShowResponse,
    TagsResponse,
    VersionResponse,
)
from minicpm_server.api.ollama_responses import OllamaChatFormat, OllamaFormat, OllamaGenerateFormat
from minicpm_server.api.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    FaultRequest,
    HealthResponse,
    LegacyChatRequest,
    LegacyChatResponse,
    LegacyErrorResponse,
    ModelCard,
    ModelList,
    OpenAIFields,
    PromptInput,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
    error_responses,
)
from minicpm_server.api.responses import ChatFormat, CompletionFormat, LegacyFormat, OpenAIFormat, TokenNames
from minicpm_server.api.service import ModelService
from minicpm_server.api.structured import chat_turns
from minicpm_server.engine.protocol import DEFAULT_REPETITION_PENALTY, DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from minicpm_server.model import chat
from minicpm_server.model.facts import ModelFacts
from minicpm_server.settings import Settings

if TYPE_CHECKING:
    from minicpm_server.model.checkpoint import Preflight
    from minicpm_server.model.tokenizer import Tokenizer

# Headers that keep proxies (nginx, AutoDL's port mapping) from buffering a stream.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

log = logging.getLogger("minicpm_server")


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
    router = APIRouter(tags=["tutorial"])

    @router.post(
        "/",
        response_model=LegacyChatResponse,
        responses={
            200: {"content": {"application/x-ndjson": {}}},
            **error_responses(400, 401, 413, 429, 503, 504, model=LegacyErrorResponse),
        },
        summary="The tutorial's chat endpoint",
    )
    async def legacy_chat(body: LegacyChatRequest, request: Request) -> Any:
        (gen,) = await _submit(request, body)
        if body.stream:
            stream = LegacyFormat.stream(gen.events())
            return StreamingResponse(stream, media_type="application/x-ndjson", headers=STREAM_HEADERS)
        return LegacyFormat.answer(await gen.complete())

    return router


async def _submit(request: Request, body: Any) -> list[generation.TrackedGeneration]:
    service = _service(request)
    engine = service.require_engine()
    return await generation.submit(engine, body, request, service.metrics, service.settings.request_timeout)


async def _openai_generation(
    request: Request, body: OpenAIFields, formatter: Callable[[TokenNames, list[PromptInput]], OpenAIFormat]
) -> Any:
    gens = await _submit(request, body)
    service = _service(request)
    model = service.settings.model_name
    answer = formatter(TokenNames(service.require_engine().tokenizer), [g.prepared.prompt for g in gens])
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = answer.stream(generation.merged_events(gens), model, include_usage)
        return StreamingResponse(stream, media_type="text/event-stream", headers=STREAM_HEADERS)
    return answer.answer(await generation.complete_all(gens), model)


def openai_routes() -> APIRouter:
    router = APIRouter(prefix="/v1")
    errors = {200: {"content": {"text/event-stream": {}}}, **error_responses(400, 401, 413, 429, 503, 504)}

    @router.get("/models", response_model=ModelList, responses=error_responses(401))
    async def list_models(request: Request) -> Any:
        service = _service(request)
        return ModelList(data=[ModelCard(id=service.settings.model_name, created=service.created)])

    @router.get("/models/{model_id:path}", response_model=ModelCard, responses=error_responses(401, 404))
    async def retrieve_model(model_id: str, request: Request) -> Any:
        service = _service(request)
        if model_id != service.settings.model_name:
            message = f"no model '{model_id}': this server serves '{service.settings.model_name}'"
            raise APIError(404, message, param="model", code="model_not_found")
        return ModelCard(id=model_id, created=service.created)

    @router.post("/chat/completions", response_model=ChatCompletionResponse, responses=errors)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await _openai_generation(
            request,
            body,
            lambda names, prompts: ChatFormat(names, prompts, body.logprobs, body if body.calls_tools else None),
        )

    @router.post("/completions", response_model=CompletionResponse, responses=errors)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await _openai_generation(
            request, body, lambda names, prompts: CompletionFormat(names, prompts, body.logprobs, body.echo)
        )

    return router


# Ollama's model-management routes, which a server of one checkpoint cannot honour, and what to do instead.
OLLAMA_REFUSALS: list[tuple[str, str, str]] = [
    (
        "POST",
        "/pull",
        "this server serves one model, '{model}', and cannot pull others: download MiniCPM-2B with "
        "'python download.py' and start a server with --model-path",
    ),
    ("POST", "/push", "this server cannot push models to a registry"),
    (
        "POST",
        "/create",
        "this server cannot create models from a Modelfile: it serves '{model}' from --model-path; "
        "send sampling settings as each request's options",
    ),
    ("DELETE", "/delete", "this server cannot delete models: stop it and remove the checkpoint directory"),
    ("POST", "/copy", "this server cannot copy models: requests may name '{model}' by any name"),
    ("POST", "/embed", "'{model}' is a chat model, not an embedding model: this server computes no embeddings"),
    ("POST", "/embeddings", "'{model}' is a chat model, not an embedding model: this server computes no embeddings"),
]


def ollama_routes() -> APIRouter:
    """Ollama's API (its docs/api.md), so Ollama's clients work unchanged; errors answer Ollama's
    `{"error": "..."}` (errors.py, from this router's prefix)."""
    router = APIRouter(prefix="/api", tags=["ollama"])
    generation_errors = {
        200: {"content": {"application/x-ndjson": {}}},
        **error_responses(400, 401, 413, 429, 503, 504, model=OllamaError),
    }

    @router.post("/chat", response_model=OllamaChatResponse, responses=generation_errors)
    async def chat_route(body: OllamaChatRequest, request: Request) -> Any:
        return await _ollama_generation(request, body, OllamaChatFormat)

    @router.post("/generate", response_model=OllamaGenerateResponse, responses=generation_errors)
    async def generate(body: OllamaGenerateRequest, request: Request) -> Any:
        return await _ollama_generation(request, body, OllamaGenerateFormat)

    @router.get("/tags", response_model=TagsResponse, responses=error_responses(401, 503, model=OllamaError))
    async def tags(request: Request) -> TagsResponse:
        service = _service(request)
        service.require_engine()
        return TagsResponse(models=[ollama_responses.listed(service.settings.model_name, _facts(service))])

    @router.post("/show", response_model=ShowResponse, responses=error_responses(400, 401, 404, 503, model=OllamaError))
    async def show(body: OllamaShowRequest, request: Request) -> ShowResponse:
        service = _service(request)
        engine = service.require_engine()
        name = service.settings.model_name
        if body.asked not in (name, f"{name}:latest"):  # Ollama reads a name without a tag as ":latest"
            raise APIError(404, f"model '{body.asked}' not found: this server serves '{name}'")
        template = engine.tokenizer.chat_template or chat.MINICPM_CHAT_TEMPLATE
        return ollama_responses.show(name, _facts(service), engine.context_window, template)

    @router.get("/ps", response_model=PsResponse, responses=error_responses(401, model=OllamaError))
    async def ps(request: Request) -> PsResponse:
        """The model in memory: none while it loads."""
        service = _service(request)
        engine = service.engine
        if engine is None or service.facts is None or not engine.alive:
            return PsResponse(models=[])
        name = service.settings.model_name
        return PsResponse(models=[ollama_responses.running(name, service.facts, engine.context_window)])

    @router.get("/version", response_model=VersionResponse, responses=error_responses(401, model=OllamaError))
    async def version(request: Request) -> VersionResponse:
        return VersionResponse(version=OLLAMA_API_VERSION)

    for method, path, message in OLLAMA_REFUSALS:
        router.add_api_route(
            path,
            _refusal(message),
            methods=[method],
            responses=error_responses(400, 401, model=OllamaError),
            summary=f"Not offered: {method} /api{path}",
        )
    return router


def _refusal(message: str) -> Callable[[Request], Any]:
    async def refuse(request: Request) -> None:
        raise APIError(400, message.format(model=_service(request).settings.model_name))

    return refuse


def _facts(service: ModelService) -> ModelFacts:
    assert service.facts is not None  # set before the engine is (service.py)
    return service.facts


async def _ollama_generation(
    request: Request, body: OllamaGeneration, formatter: Callable[[str, TokenNames, bool], OllamaFormat]
) -> Any:
    service = _service(request)
    engine = service.require_engine()
    answer = formatter(service.settings.model_name, TokenNames(engine.tokenizer), body.logprobs)
    if body.loads_only:
        return JSONResponse(answer.loaded())
    (gen,) = await _submit(request, body)
    if body.stream:
        return StreamingResponse(answer.stream(gen), media_type="application/x-ndjson", headers=STREAM_HEADERS)
    return JSONResponse(await answer.whole(gen))


def tokenizer_routes() -> APIRouter:
    """vLLM's tokenizer endpoints: the server's own ids (sentencepiece), so a client such as
    lm-eval's remote tokenizer needs no copy of the tokenizer and no model hub."""
    router = APIRouter(tags=["tokenizer"])
    errors = error_responses(400, 401, 413, 503)

    @router.post("/tokenize", response_model=TokenizeResponse, responses=errors)
    async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
        engine = _service(request).require_engine()
        ids = await asyncio.to_thread(_tokenize, engine.tokenizer, body)
        strs = [engine.tokenizer.token_text(i) for i in ids] if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=engine.context_window, tokens=ids, token_strs=strs)

    @router.post("/detokenize", response_model=DetokenizeResponse, responses=errors)
    async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
        tokenizer = _service(request).require_engine().tokenizer
        for position, token in enumerate(body.tokens):
            if token >= tokenizer.vocab_size:
                message = (
                    f"tokens[{position}]: token id {token} is outside the vocabulary (0..{tokenizer.vocab_size - 1})"
                )
                raise APIError(400, message, param="tokens", code="invalid_token_id")
        return DetokenizeResponse(prompt=tokenizer.decode(body.tokens))

    @router.get("/tokenizer_info", response_model=TokenizerInfo, responses=error_responses(401, 503))
    async def tokenizer_info(request: Request) -> TokenizerInfo:
        engine = _service(request).require_engine()
        t = engine.tokenizer
        return TokenizerInfo(
            tokenizer_class=type(t).__name__,
            bos_token=t.bos_token,
            eos_token=t.eos_token,
            bos_token_id=t.bos_token_id,
            eos_token_id=t.eos_token_id,
            vocab_size=t.vocab_size,
            model_max_length=engine.context_window,
            chat_template=t.chat_template or chat.MINICPM_CHAT_TEMPLATE,
        )

    return router


def _tokenize(tokenizer: Tokenizer, body: TokenizeRequest) -> list[int]:
    """Text reads control tokens' names ("</s>" is EOS, as in Hugging Face tokenizers and vLLM);
    messages are rendered and encoded exactly as a chat prompt is (there "</s>" stays text)."""
    if body.messages is not None:
        text = chat.render_chat(tokenizer, chat_turns(body.messages))
        ids = tokenizer.encode(text)
        return ids if body.add_special_tokens is not False else ids[1:]
    assert body.prompt is not None
    ids = tokenizer.encode_with_control_tokens(body.prompt)
    return [tokenizer.bos_token_id, *ids] if body.add_special_tokens is not False else ids


def fault_routes() -> APIRouter:
    """Testing only (--testing-fault-injection): make the engine fail the way a GPU can."""
    router = APIRouter()

    @router.post("/debug/fault", status_code=202, responses=error_responses(400, 401, 503))
    async def inject_fault(body: FaultRequest, request: Request) -> dict[str, str]:
        _service(request).require_engine().inject_fault(body.kind)
        return {"status": "armed", "kind": body.kind}

    return router


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
        engine = service.engine
        return {
            "model": service.settings.model_name,
            "context_window": engine.context_window if engine else None,
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


def create_app(
    settings: Settings,
    on_fatal: Callable[[str], None] | None = None,
    preflight: Preflight | None = None,
    *,
    listening: bool = True,
) -> FastAPI:
    """The app; `preflight` carries the start-up checks api.py already made, so they run once.
    `listening`: served on settings.host and port (api.py); a Ray replica is not (Ray's proxy
    is what clients reach), so it does not warn about the interface."""
    metrics = Metrics(settings.model_name)
    service = ModelService(settings, metrics, on_fatal, preflight)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if listening and settings.public_interface and not settings.api_key:
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
    tutorial = legacy_routes()
    app.state.tutorial_endpoints = endpoints_of(tutorial)  # their errors carry the tutorial's keys (errors.py)
    app.include_router(tutorial, dependencies=guarded)
    app.include_router(openai_routes(), dependencies=guarded)
    ollama = ollama_routes()
    app.state.ollama_prefix = ollama.prefix  # errors under it take Ollama's shape (errors.py)
    app.include_router(ollama, dependencies=guarded)
    app.include_router(tokenizer_routes(), dependencies=guarded)
    app.include_router(metrics_routes(), dependencies=guarded)
    if settings.testing_fault_injection:
        log.warning("fault injection is enabled (POST /debug/fault): for tests only")
        app.include_router(fault_routes(), dependencies=guarded)
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
            expose_headers=["X-Request-Id"],
        )
    app.add_middleware(LenientJsonBodyMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestLogMiddleware, metrics=metrics, log_prompts=settings.log_prompts)
    app.add_middleware(RequestIdMiddleware)  # outermost: everything inside sees the id
    return app
