"""The HTTP connection layer under the app: a read deadline per request and a cap on open connections.

Why: uvicorn waits for a request's headers and body as long as the client keeps the socket open,
and every byte it receives restarts its keep-alive timer. A client that trickles one byte every
few seconds holds a connection (and a file descriptor) forever; a few thousand of them exhaust a
low `ulimit -n` or a proxy's connection cap, and on AutoDL the port is on the internet.

So each connection gets, on top of uvicorn's own h11 protocol:

* **a read deadline** (`--read-timeout`): from a connection's first byte (or its opening, for a
  client that sends nothing), the request's headers and body must be complete within the
  deadline, or the client gets 408 and the connection is closed. The clock stops once the body
  is in, so a long answer (a stream of minutes) is never cut; it starts again with the next
  request's first byte on a kept-alive connection. Between requests, uvicorn's
  `--timeout-keep-alive` closes idle connections as before.
* **a cap** (`--max-connections`): a connection past it is answered 503 at once (JSON, with
  Retry-After) and closed, before any of it is read.

Both answers are written straight to the socket: no request has reached the app yet (or the app
is waiting for a body that will not come), so there is no ASGI response to send them through.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("minicpm_server")


def raw_json_response(status: int, reason: str, error: dict, headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 response that closes the connection, with an OpenAI-shaped error body."""
    request_id = uuid.uuid4().hex
    body = json.dumps({"error": {**error, "request_id": request_id}}).encode()
    lines = [
        f"HTTP/1.1 {status} {reason}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        f"x-request-id: {request_id}",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def timeout_response(read_timeout: float) -> bytes:
    error = {
        "message": f"the request's headers and body did not arrive within {read_timeout:g} s (--read-timeout)",
        "type": "invalid_request_error",
        "param": None,
        "code": "request_timeout",
    }
    return raw_json_response(408, "Request Timeout", error)


def too_many_response(max_connections: int) -> bytes:
    error = {
        "message": f"the server has all the connections it allows open (--max-connections {max_connections}); "
        "retry shortly",
        "type": "service_unavailable",
        "param": None,
        "code": "too_many_connections",
    }
    return raw_json_response(503, "Service Unavailable", error, {"retry-after": "1"})


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a read deadline and a connection cap (class attributes, set by
    `guarded_protocol`). Counters are shared by every connection of the server."""

    read_timeout: float = 0.0  # 0: no deadline
    max_connections: int = 0  # 0: no cap
    on_refused: Callable[[str], None] = staticmethod(lambda reason: None)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._deadline_cycle = None  # the request cycle that existed when the clock started
        if self.max_connections and len(self.connections) > self.max_connections:
            self._refuse(too_many_response(self.max_connections), "too_many_connections")
            return
        self._start_deadline()  # a client that connects and sends nothing is on the clock too

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self._between_requests():
            self._start_deadline()  # the first byte of the next request on a kept-alive connection
        super().data_received(data)
        if self._deadline is not None and self._request_read():
            self._stop_deadline()

    # ----------------------------------------------------------------- the deadline

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _request_read(self) -> bool:
        """Whether a request that started on this clock has all its headers and body in."""
        cycle = self.cycle
        return cycle is not None and cycle is not self._deadline_cycle and not cycle.more_body

    def _start_deadline(self) -> None:
        if self.read_timeout > 0:
            self._deadline_cycle = self.cycle
            self._deadline = self.loop.call_later(self.read_timeout, self._on_deadline)

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _on_deadline(self) -> None:
        self._deadline = None
        cycle = self.cycle if self.cycle is not self._deadline_cycle else None
        if cycle is not None and cycle.response_started:
            # The app answered before the body was in (a 413, say): only close.
            self.transport.close()
            return
        if cycle is not None:
            cycle.scope.setdefault("state", {})["read_timeout"] = True  # the request log says 408, not 400
            cycle.disconnected = True  # the app, waiting for the body, reads a disconnect
            cycle.message_event.set()
        self._refuse(timeout_response(self.read_timeout), "read_timeout")

    def _refuse(self, response: bytes, reason: str) -> None:
        self.on_refused(reason)
        if not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()


def guarded_protocol(
    read_timeout: float, max_connections: int, on_refused: Callable[[str], None] | None = None
) -> type[H11Protocol]:
    """The protocol class to give uvicorn (`http=`), with these limits."""
    attributes = {"read_timeout": read_timeout, "max_connections": max_connections}
    if on_refused is not None:
        attributes["on_refused"] = staticmethod(on_refused)
    return type("GuardedH11Protocol", (GuardedH11Protocol,), attributes)
