"""uvicorn, with a drain: the first SIGTERM/SIGINT lets in-flight requests finish."""

from __future__ import annotations

import logging
import threading
from typing import Any

import uvicorn

from minicpm_server.api.service import ModelService

log = logging.getLogger("minicpm_server")


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains in-flight requests before exiting; a second one forces."""

    def __init__(self, config: uvicorn.Config, service: ModelService, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.service = service
        self.shutdown_timeout = shutdown_timeout

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.service.draining:
            self._exit_now()
            return
        log.info("draining: press Ctrl-C again to stop at once")
        threading.Thread(target=self._drain_then_exit, name="minicpm-drain", daemon=True).start()

    def _exit_now(self) -> None:
        """The second signal: stop the engine, which answers every request in flight with a JSON
        503 at once, so uvicorn's own shutdown has nothing left to wait for."""
        log.warning("stopping now: requests still in flight are answered 503")
        self.service.stop()
        self.should_exit = True

    def _drain_then_exit(self) -> None:
        self.service.drain(self.shutdown_timeout)
        self.should_exit = True
