"""An HTTP request carried between processes as plain data, and served by an ASGI app in-process.

The Ray ingress reads a request and hands it to an engine replica as a `ForwardedRequest`; the
replica runs it through the very app `python api.py` serves (create_app) and streams the ASGI
messages back, which the ingress relays to the client. So every route, error shape and header
is the app's own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.types import ASGIApp, Message


@dataclass(frozen=True)
class ForwardedRequest:
    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None = None
    scheme: str = "http"

    def scope(self) -> dict:
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": self.method,
            "scheme": self.scheme,
            "path": self.path,
            "raw_path": self.path.encode(),
            "root_path": "",
            "query_string": self.query_string,
            "headers": list(self.headers),
            "client": self.client,
            "server": None,
        }


async def serve_in_process(app: ASGIApp, request: ForwardedRequest) -> AsyncIterator[Message]:
    """Run one request through `app`, yielding what it sends (response start, body chunks).

    The body is delivered whole; after it, `receive` waits until the caller stops iterating, which
    is how a disconnect reaches the app: closing this generator cancels the app's task, and the
    engine's request with it."""
    outbox: asyncio.Queue[Message | None] = asyncio.Queue()
    body_given = False
    never: asyncio.Future[Message] = asyncio.get_running_loop().create_future()

    async def receive() -> Message:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        return await never

    async def send(message: Message) -> None:
        await outbox.put(message)

    task = asyncio.create_task(app(request.scope(), receive, send))
    task.add_done_callback(lambda _: outbox.put_nowait(None))
    try:
        while (message := await outbox.get()) is not None:
            yield message
        task.result()  # an app that crashed after answering part of the stream: the caller aborts
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
