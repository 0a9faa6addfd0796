"""uvicorn, with a drain: the first SIGTERM/SIGINT lets in-flight requests finish."""

from __future__ import annotations

import threading
from typing import Any

import uvicorn

from minicpm_server.api.service import ModelService


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
