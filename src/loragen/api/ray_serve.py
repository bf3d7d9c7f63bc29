"""`loragen serve --engine ray`: the app of `create_app`, unchanged, as a Ray Serve ingress deployment.

Each replica is one Ray actor that builds its own app: it opens the registry, loads its own text
encoder, generators and base model, and micro-batches its own requests. A replica joins the
routing table only once its service is warm (its start-up waits for that), so traffic never
reaches a replica that would answer 503 "not ready". Ray Serve's proxy spreads requests over the
replicas and restarts a replica whose process dies.

Two additions, both wrappers around the unchanged app:
- `/readyz` is 200 only while every replica of the deployment is running (and this one is ready);
  otherwise 503 with how many are, so a load balancer holds traffic back during a restart.
- The registry is served read-only: each replica opens it in SQLite's read-only mode
  (`registry_read_only`), and the expert-changing routes answer 405, since a write through one
  replica would bypass the others' micro-batchers and caches. Add experts with `loragen registry`
  (or a plain server); replicas' searches follow the committed writes.

Replicas keep no state beyond caches, so a LoRA id is known only to the replica that generated it
(`GET /v1/loras/{id}`, completions naming a LoRA id); a request that carries its description is
served by any replica.

`ray` is imported only when this runs; `pip install loragen[ray]` provides it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import LoragenError
from .app import create_app
from .errors import error_response
from .settings import ApiSettings

log = logging.getLogger(__name__)
APP_NAME = "loragen"
DEPLOYMENT = "LoragenReplica"
WRITE_ROUTES = ("/v1/experts",)


# Ray Serve fails a proxy that is not ready within 5 s and restarts it; on a busy machine its start
# (imports, the HTTP server) takes longer, and the restarts never end. Set before Ray starts, so the
# local cluster's controller reads them; a variable already set wins.
PATIENT_PROXY_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30"}


def patient_proxy_env() -> None:
    for name, value in PATIENT_PROXY_ENV.items():
        os.environ.setdefault(name, value)


def import_ray() -> Any:
    try:
        import ray
        from ray import serve  # noqa: F401
    except ImportError as exc:
        raise LoragenError("--engine ray needs Ray Serve: pip install 'loragen[ray]'") from exc
    return ray


@dataclass(frozen=True)
class RayServeOptions:
    replicas: int = 1
    address: str | None = None  # None: a local Ray started for this process
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    max_ongoing_requests: int = 64  # per replica; past it Ray Serve queues at the proxy


def replicas_pending(replicas: int) -> str | None:
    """None when the deployment has `replicas` replicas running, else what it has."""
    from ray import serve

    app = serve.status().applications.get(APP_NAME)
    deployment = app.deployments.get(DEPLOYMENT) if app is not None else None
    if deployment is None:
        return "the deployment is not running"
    states = {str(getattr(k, "value", k)): v for k, v in deployment.replica_states.items()}
    running = states.get("RUNNING", 0)
    if running >= replicas and str(getattr(deployment.status, "value", deployment.status)) == "HEALTHY":
        return None
    others = ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items()) if s != "RUNNING" and n)
    return f"{running} of {replicas} replicas running" + (f" ({others})" if others else "")


class ClusterGate:
    """ASGI wrapper: `/readyz` answers 503 unless every replica runs; expert writes answer 405."""

    def __init__(self, app: ASGIApp, pending: Callable[[], Awaitable[str | None]]) -> None:
        self.app, self.pending = app, pending

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path, method = scope["path"], scope["method"]
            if path == "/readyz":
                pending = await self.pending()
                if pending:
                    await error_response(503, "not_ready", f"not ready: {pending}", {"Retry-After": "1"})(
                        scope, receive, send)
                    return
            elif method in ("POST", "PUT", "PATCH", "DELETE") and path.startswith(WRITE_ROUTES):
                await error_response(405, "read_only", "this deployment serves the registry read-only; add or "
                                     "remove experts with `loragen registry` and redeploy")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _until_ready(app: FastAPI) -> None:
    """Make the app's start-up return only once its service is warm (or raise if a part failed)."""
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[Any]:
        async with inner(a) as state:
            service = a.state.service
            while not service.ready:
                failed = [f"{c}: {s}" for c, s in service.readiness.state.items() if s.startswith("failed")]
                if failed:
                    raise RuntimeError("the replica could not load " + "; ".join(failed))
                await asyncio.sleep(0.05)
            yield state

    app.router.lifespan_context = lifespan


class LoragenReplica:
    """The user class of the deployment; `serve.ingress()` wraps it around the app it builds."""

    def __init__(self, settings: ApiSettings, replicas: int) -> None:
        self.settings, self.replicas = settings.model_copy(update={"registry_read_only": True}), replicas
        self._checked = (0.0, "not checked yet")

    def __serve_build_asgi_app__(self) -> ASGIApp:
        app = create_app(self.settings)
        _until_ready(app)
        app.add_middleware(ClusterGate, pending=self._pending)
        return app

    async def _pending(self) -> str | None:
        at, pending = self._checked
        if time.monotonic() - at > 0.5:  # the controller is asked at most twice a second per replica
            pending = await asyncio.to_thread(replicas_pending, self.replicas)
            self._checked = (time.monotonic(), pending)
        return pending


def application(settings: ApiSettings, options: RayServeOptions) -> Any:
    """The bound Ray Serve application: `options.replicas` replicas of the ingress deployment."""
    from ray import serve

    cls = serve.ingress()(LoragenReplica)
    deployment = serve.deployment(cls, name=DEPLOYMENT, num_replicas=options.replicas,
                                  max_ongoing_requests=options.max_ongoing_requests,
                                  ray_actor_options={"num_cpus": options.cpus_per_replica,
                                                     "num_gpus": options.gpus_per_replica})
    return deployment.bind(settings, options.replicas)


def deploy(settings: ApiSettings, options: RayServeOptions) -> str:
    """Connect to (or start) Ray, start Serve's HTTP proxy on settings.host:port, deploy, and wait
    until every replica runs; returns the URL."""
    ray = import_ray()
    from ray import serve

    if not ray.is_initialized():
        patient_proxy_env()
        ray.init(address=options.address, logging_level=logging.WARNING)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(application(settings, options), name=APP_NAME, route_prefix="/")
    return f"http://{settings.host}:{settings.port}"


def undeploy() -> None:
    from ray import serve

    serve.delete(APP_NAME)
