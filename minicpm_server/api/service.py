"""The model's lifecycle for the app: load in the background, serve, drain, stop.

The model loads on a background thread after the server starts listening, so `/health` answers
503 ("loading") until the engine is ready and 200 after; generation routes answer 503 with
Retry-After meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from minicpm_server.api.errors import APIError
from minicpm_server.api.metrics import Metrics
from minicpm_server.api.protocol import HealthResponse
from minicpm_server.engine import create_engine, quantization
from minicpm_server.engine.protocol import Engine, EngineStats
from minicpm_server.exceptions import StartupError, one_line
from minicpm_server.model.facts import ModelFacts, model_facts
from minicpm_server.settings import Settings

if TYPE_CHECKING:
    from minicpm_server.model.checkpoint import Preflight

log = logging.getLogger("minicpm_server")


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

    def start_loading(self) -> None:
        threading.Thread(target=self._load, name="minicpm-loader", daemon=True).start()

    def _load(self) -> None:
        # torch: loaded with the model, not with the app
        from minicpm_server.model.checkpoint import preflight, resolve_dtype

        s = self.settings
        try:
            checked = self.preflight or preflight(s.model_path, s.device)
            engine = create_engine(s, checked)
            engine.start()
            self.metrics.watch_engine(engine)
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
        self.engine, self.state = engine, "ready"
        log.info(
            "ready: %s on the %s engine (context window %d tokens)", s.model_name, engine.name, engine.context_window
        )

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
