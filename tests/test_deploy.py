"""The parts of the Ray Serve application that need no Ray (minicpm_server/deploy): the prompt's
text for routing, the prefix index and choice, and running a forwarded request through an ASGI
app in-process. tests/test_ray.py runs the whole on a local Ray cluster."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from minicpm_server.deploy.forwarding import ForwardedRequest, serve_in_process
from minicpm_server.deploy.routing import PrefixIndex, block_hashes, choose_by_prefix, routing_text

# --------------------------------------------------------------------------- routing, without Ray


def test_routing_text_extends_as_a_chat_goes_on() -> None:
    first = [{"role": "user", "content": "hello"}]
    later = [*first, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "more"}]
    for path, key, turn1, turn3 in (
        ("/v1/chat/completions", "messages", first, later),
        ("/api/chat", "messages", first, later),
    ):
        a = routing_text(path, json.dumps({key: turn1}).encode())
        b = routing_text(path, json.dumps({key: turn3}).encode())
        assert a and b.startswith(a) and len(b) > len(a)
    # The tutorial's POST /: the prompt is the newest user turn, after the history.
    a = routing_text("/", json.dumps({"prompt": "hello"}).encode())
    b = routing_text("/", json.dumps({"prompt": "more", "history": later[:2]}).encode())
    assert b.startswith(a)


@pytest.mark.parametrize("body", [b"", b"{bad", b"[1, 2]", b'{"prompt": {"x": 1}}', b'{"messages": "no"}', b"\xff\xfe"])
def test_routing_text_of_malformed_bodies_is_empty(body: bytes) -> None:
    assert routing_text("/v1/completions", body) == ""


def test_block_hashes_are_chained() -> None:
    a = block_hashes("x" * 40, 16)
    b = block_hashes("y" + "x" * 39, 16)
    assert len(a) == 2 and a[1] != b[1]  # block 1 is equal text, but its prefix differs
    assert block_hashes("x" * 15, 16) == []


def test_longest_cached_prefix_wins_unless_load_is_uneven() -> None:
    index = PrefixIndex()
    chat = block_hashes("a" * 64)
    index.record("r1", chat[:2])
    index.record("r2", chat)
    assert choose_by_prefix(index, chat, {"r1": 0, "r2": 0, "r3": 0}, 4)[0] == ["r2"]
    assert choose_by_prefix(index, chat, {"r1": 0, "r2": 4, "r3": 0}, 4)[0] == ["r2"]
    # Busier than the least loaded by more than the threshold: all replicas, the caller takes the lightest.
    assert sorted(choose_by_prefix(index, chat, {"r1": 0, "r2": 5, "r3": 0}, 4)[0]) == ["r1", "r2", "r3"]
    # An unseen prompt: every replica in one rank.
    assert len(choose_by_prefix(index, block_hashes("b" * 64), {"r1": 0, "r2": 0}, 4)) == 1


def test_forgotten_replicas_and_lru_bound() -> None:
    index = PrefixIndex(max_blocks_per_replica=3)
    hashes = block_hashes("c" * 80)  # 5 blocks
    index.record("r1", hashes)
    assert index.matched_blocks("r1", hashes) == 0  # the oldest (leading) blocks were dropped
    index.record("r1", hashes[:3])
    assert index.matched_blocks("r1", hashes) == 3
    index.keep_only(["r2"])
    assert index.matched_blocks("r1", hashes) == 0


# --------------------------------------------------------------------------- forwarding


def _app(events: list[str]) -> Starlette:
    async def echo(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse({"path": request.url.path, "query": request.url.query, "got": body}, status_code=201)

    async def stream(request: Request) -> StreamingResponse:
        async def chunks():
            try:
                for n in range(1000):
                    yield f"{n}\n"
                    await asyncio.sleep(0.01)
                events.append("finished")
            except asyncio.CancelledError:
                events.append("cancelled")
                raise

        return StreamingResponse(chunks(), media_type="text/plain")

    return Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/stream", stream)])


def _forwarded(method: str, path: str, body: bytes = b"", query: bytes = b"") -> ForwardedRequest:
    return ForwardedRequest(method, path, query, [(b"content-type", b"application/json")], body, ("127.0.0.1", 1))


def test_a_forwarded_request_gets_the_apps_answer() -> None:
    async def main() -> list[dict]:
        app = _app([])
        return [m async for m in serve_in_process(app, _forwarded("POST", "/echo", b'{"a": 1}', b"x=2"))]

    messages = asyncio.run(main())
    assert messages[0]["type"] == "http.response.start" and messages[0]["status"] == 201
    body = b"".join(m.get("body", b"") for m in messages[1:])
    assert json.loads(body) == {"path": "/echo", "query": "x=2", "got": {"a": 1}}


def test_leaving_a_stream_early_cancels_the_app() -> None:
    """What a client's disconnect does through Ray: the replica's generator is closed."""
    events: list[str] = []

    async def main() -> list[bytes]:
        chunks = []
        stream = serve_in_process(_app(events), _forwarded("GET", "/stream"))
        async for message in stream:
            if message["type"] == "http.response.body":
                chunks.append(message["body"])
            if len(chunks) == 3:
                break
        await stream.aclose()
        await asyncio.sleep(0.05)
        return chunks

    assert asyncio.run(main()) == [b"0\n", b"1\n", b"2\n"]
    assert events == ["cancelled"]
