"""The server as a Ray Serve application: N engine replicas behind Ray's HTTP proxy.

    serve run deploy/ray-serve.yaml                 # or:
    serve run minicpm_server.deploy.ray_serve:build_app model_path=/root/autodl-tmp/...

Two deployments:
- `MiniCPMReplica`: one engine each (one GPU each on CUDA), running in-process the very app that
  `python api.py` serves (api/app.py's create_app), so every route, error and header is the same.
  Ray replaces a replica whose process died or whose `check_health` fails (the engine stopped).
- `MiniCPMIngress`: what Ray's proxy calls. It reads the request, takes the prompt's text from
  the body, and forwards the request to a replica through a deployment handle whose router is
  `PrefixAffinityRouter`. This tier exists because Ray's proxy hands an HTTP deployment only the
  request's headers when it routes; the body follows later, so a router in front of the replicas
  could not see the prompt. Answers stream back message by message.

Failures (issue #24, item 4): a request whose replica dies before it has answered anything, or
answers 503 (its engine stopped, it is shutting down), is sent once more, to another replica
(generation has no side effects, so a retry is safe). If that fails too the client gets a 503 in
the endpoint's error shape; a replica lost mid-stream cuts the client's connection, since a
status already sent cannot be changed.

Settings: the same Settings as api.py (MINICPM_* environment variables, or the builder's args
under the flags' names); Ray-specific args are in `RayArgs`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, Field
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Message

from minicpm_server.api.app import create_app
from minicpm_server.api.errors import APIError, error_response
from minicpm_server.deploy.forwarding import ForwardedRequest, serve_in_process
from minicpm_server.deploy.metrics_export import RayMetricsExport
from minicpm_server.deploy.routing import (
    BLOCK_CHARS,
    MAX_BLOCKS_PER_REPLICA,
    PrefixIndex,
    block_hashes,
    choose_by_prefix,
    routing_text,
)
from minicpm_server.settings import Settings

log = logging.getLogger("minicpm_server")

# Which replica answered: tests and benchmarks count replicas with it, operators debug routing.
REPLICA_HEADER = b"x-minicpm-replica"
# Tries per request: the first, and one more when its replica died before answering anything.
ATTEMPTS = 2
REPLICA_GONE = (RayActorError, ActorUnavailableError)


class RayArgs(BaseModel):
    """What only the Ray application takes, besides Settings' fields."""

    routing: Literal["prefix", "power_of_two"] = Field(
        "prefix", description="prefix: PrefixAffinityRouter; power_of_two: Ray Serve's default router."
    )
    imbalance_threshold: int = Field(
        4, ge=0, description="Ongoing requests by which a prefix-matched replica may exceed the least loaded."
    )
    num_replicas: int | None = Field(
        None, ge=1, description="Fixed replicas (default: Ray's, 1, or a Serve config's num_replicas/autoscaling)."
    )
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="Ray Serve's autoscaling_config for the replicas (min/max_replicas, target_ongoing_requests)."
    )
    metrics_export_period_s: float = Field(
        2.0, gt=0, description="How often each replica copies its metrics to Ray's metrics export."
    )
    replica_cpus: float = Field(1.0, ge=0, description="Ray CPUs each replica reserves.")
    replica_gpus: float | None = Field(
        None, ge=0, description="GPUs each replica reserves (default: 1 when device is cuda, else 0)."
    )


# --------------------------------------------------------------------------- routing


class PrefixAffinityRouter(RequestRouter):
    """Sends a prompt to the replica that was sent the longest part of its prefix (routing.py),
    unless that replica is busier than the least loaded by more than `imbalance_threshold`
    ongoing requests; then, and for prompts nobody has seen, the least loaded replica."""

    def initialize_state(
        self,
        imbalance_threshold: int = 4,
        block_chars: int = BLOCK_CHARS,
        max_blocks_per_replica: int = MAX_BLOCKS_PER_REPLICA,
    ) -> None:
        self._imbalance_threshold = imbalance_threshold
        self._block_chars = block_chars
        self._index = PrefixIndex(max_blocks_per_replica)

    def _hashes(self, pending_request: PendingRequest | None) -> list[int]:
        text = pending_request.kwargs.get("routing_text", "") if pending_request is not None else ""
        return block_hashes(text, self._block_chars) if isinstance(text, str) else []

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Without locality passes there is nothing to try before backing off (Ray's own
            # routers set this from their locality mixin).
            pending_request.routing_context.should_backoff = True
        by_id = {r.replica_id: r for r in _without_avoided(candidate_replicas, pending_request)}
        # Ongoing requests as the router last knew them (sends count at once, probes refresh);
        # Ray probes any replica the ranks name whose entry is missing or stale.
        loads = {rid: self.replica_queue_len_cache.get(rid) or 0 for rid in by_id}
        ranks = choose_by_prefix(self._index, self._hashes(pending_request), loads, self._imbalance_threshold)
        return [[by_id[rid] for rid in rank] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult) -> None:
        self._index.record(replica_id, self._hashes(pending_request))

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._index.keep_only(r.replica_id for r in replicas)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._index.forget(replica_id)


def _without_avoided(replicas: list[RunningReplica], pending_request: PendingRequest | None) -> list[RunningReplica]:
    """A retry names the replica that just failed it; any other will do, if there is one."""
    avoid = pending_request.kwargs.get("avoid_replica") if pending_request is not None else None
    others = [r for r in replicas if r.replica_id.unique_id != avoid]
    return others or replicas


# --------------------------------------------------------------------------- the deployments


@serve.deployment(name="MiniCPMReplica", health_check_period_s=2, health_check_timeout_s=30)
class MiniCPMReplica:
    """One engine behind the app api.py serves, started and stopped by the app's own lifespan."""

    async def __init__(self, settings: Settings, metrics_export_period_s: float = 2.0) -> None:
        from minicpm_server.model.tiny import demo_settings  # torch: in replicas only

        self.app = create_app(demo_settings(settings), listening=False)  # clients reach Ray's proxy, not us
        self.service = self.app.state.service
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        # Ray counts the replica as starting until this returns: no request reaches it loading.
        while self.service.state == "loading":
            await asyncio.sleep(0.1)
        if self.service.state != "ready":
            raise RuntimeError(self.service.detail or "the model failed to load")
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._metrics = RayMetricsExport(self.service.metrics.registry, metrics_export_period_s)
        self._metrics.start()

    async def handle(
        self, request: ForwardedRequest, routing_text: str = "", avoid_replica: str = ""
    ) -> AsyncIterator[Message]:
        """The app's ASGI messages for one request (the keyword arguments are the router's)."""
        async for message in serve_in_process(self.app, request):
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (REPLICA_HEADER, self.replica_id.encode())]
                message = {**message, "headers": headers}
            yield message

    def check_health(self) -> None:
        """Ray calls this every few seconds; raising makes Ray replace the replica."""
        status, health = self.service.health()
        if status != 200:
            raise RuntimeError(f"replica unhealthy: {health.status}: {health.detail}")

    async def __del__(self) -> None:
        self._metrics.stop()
        await self._lifespan.__aexit__(None, None, None)


@serve.deployment(name="MiniCPMIngress", max_ongoing_requests=10_000, ray_actor_options={"num_cpus": 0})
class MiniCPMIngress:
    """Ray's proxy calls this; it forwards each request to a replica and relays the answer."""

    def __init__(self, replicas: DeploymentHandle, settings: Settings) -> None:
        self.replicas = replicas.options(method_name="handle", stream=True)
        self.max_body_bytes = settings.max_body_bytes
        # Never started (no model): its state gives the ingress's own errors the app's shapes.
        self.shapes = create_app(settings)

    async def __call__(self, request: Request) -> Response:
        forwarded = ForwardedRequest(
            method=request.method,
            path=_app_path(request.scope),
            query_string=request.scope.get("query_string", b""),
            headers=list(request.scope.get("headers", [])),
            # One byte past the limit is enough for the app to answer 413; the rest is not read.
            body=await _read_at_most(request, self.max_body_bytes + 1),
            client=tuple(request.scope["client"]) if request.scope.get("client") else None,
        )
        text = routing_text(forwarded.path, forwarded.body) if forwarded.method == "POST" else ""
        avoid = ""
        for attempt in range(1, ATTEMPTS + 1):
            stream: DeploymentResponseGenerator = self.replicas.remote(
                forwarded, routing_text=text, avoid_replica=avoid
            )
            try:
                start = await stream.__anext__()
            except REPLICA_GONE as exc:
                log.warning(
                    "replica lost before answering %s %s (try %d): %s", forwarded.method, forwarded.path, attempt, exc
                )
                continue
            except BackPressureError:
                error = APIError(
                    429, "all replicas' queues are full; retry shortly", code="queue_full", headers={"Retry-After": "1"}
                )
                return self._error(forwarded, error)
            if start["status"] == 503 and attempt < ATTEMPTS:
                # The replica served nothing (its engine stopped, or it is shutting down): another may.
                stream.cancel()
                avoid = dict(start.get("headers", [])).get(REPLICA_HEADER, b"").decode()
                continue
            return _relay(start, stream)
        error = APIError(
            503,
            "the replica serving this request stopped; retry",
            code="replica_unavailable",
            headers={"Retry-After": "2"},
        )
        return self._error(forwarded, error)

    def _error(self, forwarded: ForwardedRequest, error: APIError) -> Response:
        return error_response(error, {**forwarded.scope(), "app": self.shapes})


def _app_path(scope: dict) -> str:
    """The path under the application's route prefix (ASGI's `path` includes `root_path`)."""
    path, root = scope.get("path", "/"), scope.get("root_path", "")
    return (path[len(root) :] or "/") if root and path.startswith(root) else path


async def _read_at_most(request: Request, limit: int) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) >= limit:
            break
    return bytes(body[:limit])


def _relay(start: Message, stream: DeploymentResponseGenerator) -> Response:
    """The replica's answer as the ingress's: its status and headers, then its body chunks as
    they come. A replica lost mid-answer raises here, which cuts the client's connection."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for message in stream:
                if message["type"] == "http.response.body" and message.get("body"):
                    yield message["body"]
        finally:
            stream.cancel()  # the client left early: the replica stops generating

    response = StreamingResponse(body(), status_code=start["status"])
    response.raw_headers = list(start.get("headers", []))
    return response


# --------------------------------------------------------------------------- the application


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application for `serve run` / a Serve config's import_path. `args` holds Settings'
    fields (flag names, with - or _) and RayArgs'; Settings' other fields come from MINICPM_*."""
    normalized = {str(k).replace("-", "_"): v for k, v in (args or {}).items()}
    ray_fields = {k: normalized.pop(k) for k in list(normalized) if k in RayArgs.model_fields}
    unknown = sorted(set(normalized) - set(Settings.model_fields))
    if unknown:
        raise ValueError(f"unknown args for the MiniCPM application: {', '.join(unknown)}")
    settings = Settings(**normalized)
    ray_args = RayArgs(**ray_fields)
    replica = MiniCPMReplica.options(**replica_options(settings, ray_args)).bind(
        settings, ray_args.metrics_export_period_s
    )
    return MiniCPMIngress.bind(replica, settings)


def replica_options(settings: Settings, ray_args: RayArgs) -> dict[str, Any]:
    gpus = ray_args.replica_gpus if ray_args.replica_gpus is not None else (1 if settings.device == "cuda" else 0)
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": ray_args.replica_cpus, "num_gpus": gpus},
        # A batch generating and the next one waiting; beyond, requests queue at the router,
        # up to the engine's own queue size (then 429).
        "max_ongoing_requests": 2 * settings.max_batch,
        "max_queued_requests": settings.max_queue,
        "graceful_shutdown_timeout_s": settings.shutdown_timeout,
    }
    if ray_args.autoscaling_config is not None:
        options["autoscaling_config"] = ray_args.autoscaling_config
    elif ray_args.num_replicas is not None:
        options["num_replicas"] = ray_args.num_replicas
    if ray_args.routing == "prefix":
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=PrefixAffinityRouter,
            request_router_kwargs={"imbalance_threshold": ray_args.imbalance_threshold},
        )
    return options
