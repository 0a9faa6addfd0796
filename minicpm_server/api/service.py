"""The model's lifecycle for the app: load in the background, warm up, serve, drain, stop.

The model loads on a background thread after the server starts listening, so `/health` answers
503 ("loading") until the engine is ready and 200 after; generation routes answer 503 with
Retry-After meanwhile.

"Ready" means the engine has generated: before it, one token is generated from a short prompt
(the warm-up), so an engine that loads but cannot run a step (a kernel its device lacks, an
attention layout its backend refuses) fails the start-up with its error, instead of answering
503 to every request later. Once ready, a watcher notices an engine that dies (its thread, or
vLLM's worker); the server then answers what was in flight (503) and exits non-zero, so a
supervisor (systemd, Docker, Kubernetes, Ray) restarts it, rather than staying up without a model.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from minicpm_server.api.errors import APIError
from minicpm_server.api.metrics import Metrics
from minicpm_server.api.protocol import HealthResponse
from minicpm_server.engine import create_engine, quantization
from minicpm_server.engine.protocol import Engine, EngineStats, Finished, GenerationRequest, SamplingParams
from minicpm_server.exceptions import StartupError, one_line
from minicpm_server.model.facts import ModelFacts, model_facts
from minicpm_server.settings import Settings

if TYPE_CHECKING:
    from minicpm_server.model.checkpoint import Preflight

log = logging.getLogger("minicpm_server")

WARM_UP_TIMEOUT_S = 1800.0  # a first CUDA step may compile kernels; a 2-core CPU is slow
WATCH_INTERVAL_S = 0.5


class ModelService:
    """Owns the engine (and through it the model) for the app's lifetime."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        on_fatal: Callable[[str], None] | None = None,
        preflight: Preflight | None = None,
    ) -> None:
        self.settings = settings
        self.preflight = preflight
        self.metrics = metrics
        self.on_fatal = on_fatal
        self.created = int(time.time())
        self.state = "loading"
        self.detail: str | None = None
        self.engine: Engine | None = None
        self.facts: ModelFacts | None = None  # set with the engine: what Ollama's model routes describe
        self.draining = False
        self.was_ready = False
        self._stopped = threading.Event()

    def start_loading(self) -> None:
        threading.Thread(target=self._load, name="minicpm-loader", daemon=True).start()

    def _load(self) -> None:
        # torch: loaded with the model, not with the app
        from minicpm_server.model.checkpoint import preflight, resolve_dtype

        s = self.settings
        began = time.perf_counter()
        try:
            checked = self.preflight or preflight(s.model_path, s.device)
            engine = create_engine(s, checked)
            engine.start()
            self.metrics.watch_engine(engine)
            loaded = time.perf_counter()
            if s.testing_start_fault:
                log.warning("injecting a %s fault before the warm-up (--testing-start-fault)", s.testing_start_fault)
                engine.inject_fault(s.testing_start_fault)
            warm_up(engine)
            engine.reset_counters()  # the metrics count traffic, not the warm-up
            dtype = str(resolve_dtype(s.dtype, checked.device)).removeprefix("torch.")
            if quantization(s):
                dtype = quantization(s)  # the weights were quantized as they loaded
            files = checked.files
            self.facts = model_facts(files.config, files.weight_files, dtype, checked.device.type)
        except StartupError as exc:
            self._fail(str(exc))
            return
        except Exception as exc:
            self._fail(f"loading the model failed: {one_line(exc)}")
            return
        self.engine, self.state, self.was_ready = engine, "ready", True
        log.info(
            "ready: %s on the %s engine (context window %d tokens; loaded in %.1f s, warm-up generation %.2f s)",
            s.model_name,
            engine.name,
            engine.context_window,
            loaded - began,
            time.perf_counter() - loaded,
        )
        threading.Thread(target=self._watch, args=(engine,), name="minicpm-engine-watch", daemon=True).start()

    def _watch(self, engine: Engine) -> None:
        """Notice an engine that stops by itself (not by stop() or a drain): that is fatal."""
        while not self._stopped.wait(WATCH_INTERVAL_S):
            if not engine.alive and not self.draining and not self._stopped.is_set():
                self._fail(
                    "the generation engine stopped unexpectedly (see the error above); exiting so that a "
                    "supervisor can restart the server"
                )
                return

    def _fail(self, message: str) -> None:
        self.state, self.detail = "failed", message
        log.error("%s", message)
        if self.on_fatal is not None:
            self.on_fatal(message)

    def health(self) -> tuple[int, HealthResponse]:
        engine = self.engine
        stats = engine.stats if engine is not None else EngineStats()
        running, waiting = stats.running, stats.waiting
        if self.draining:
            detail = "the server is shutting down"
            return 503, HealthResponse(status="shutting_down", detail=detail, running=running, waiting=waiting)
        if self.state == "ready" and engine is not None and engine.alive:
            return 200, HealthResponse(
                status="ok", model=self.settings.model_name, engine=engine.name, running=running, waiting=waiting
            )
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
        stats = self.engine.stats if self.engine is not None else EngineStats()
        return stats.running > 0 or stats.waiting > 0

    def stop(self) -> None:
        self._stopped.set()
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


def warm_up(engine: Engine, timeout: float = WARM_UP_TIMEOUT_S) -> None:
    """Generate one token greedily from a one-token prompt, or raise StartupError saying why not."""
    request = GenerationRequest([engine.tokenizer.bos_token_id], SamplingParams(max_new_tokens=1, do_sample=False))

    async def generate_one() -> None:
        async for event in engine.submit(request).events():
            if isinstance(event, Finished):
                return

    try:
        asyncio.run(asyncio.wait_for(generate_one(), timeout))
    except asyncio.TimeoutError:
        raise StartupError(f"the engine did not generate a first token within {timeout:g} s (warm-up)") from None
    except Exception as exc:
        raise StartupError(f"the engine loaded but could not generate (warm-up): {one_line(exc)}") from None
