"""`loragen serve`: the HTTP service (FastAPI on uvicorn)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer


class EncoderDtype(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"


def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(min=0, max=65535, help="Port (default 8000).")] = None,
    registry: Annotated[Path | None, typer.Option("--registry",
                                                  help="Registry directory (default: the demo world).")] = None,
    generator: Annotated[Path | None, typer.Option("--generator", help="Trained generator directory (icm/sg), "
                                                   "or a directory holding one per method.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda.")] = None,
    max_batch: Annotated[int | None, typer.Option(min=1, help="Micro-batch size (1: off).")] = None,
    max_wait_ms: Annotated[float | None, typer.Option(min=0, help="Micro-batch wait.")] = None,
    encoder_dtype: Annotated[EncoderDtype | None, typer.Option(help="Text encoder compute dtype (default auto: "
                                                      "bfloat16 where the CPU has it natively, else float32).")] = None,
    encoder_workers: Annotated[int | None, typer.Option(min=1, max=64, help="Single-threaded workers a "
                               "text-encoding batch is split across (default 2; 1: torch's threads).")] = None,
    auth_all_routes: Annotated[bool | None, typer.Option(
        "--auth-all-routes/--auth-writes-only", help="With API keys (LORAGEN_API_KEYS): need a key on every route "
        "but the probes /healthz and /readyz, so per-key rate limits count every request.")] = None,
    max_concurrent_requests: Annotated[int | None, typer.Option(min=1, help="Requests each engine works on at "
                                                                "once (default 32).")] = None,
    max_queued_requests: Annotated[int | None, typer.Option(min=0, help="Requests waiting per engine; past it "
                                                            "429 + Retry-After (default 64).")] = None,
    request_timeout_s: Annotated[float | None, typer.Option(min=0.001, help="Each request's deadline; past it "
                                                            "504 (default 30).")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    engine: Annotated[str, typer.Option(help="plain: one uvicorn process; ray: a Ray Serve deployment "
                                        "(pip install 'loragen\\[ray]').")] = "plain",
    replicas: Annotated[int, typer.Option(min=1, help="With --engine ray: replicas, each loading its own "
                                          "generators and base model.")] = 1,
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", help="With --engine ray: the cluster (auto, ray://HOST:10001); default: a local "
        "Ray started for this command.")] = None,
    gpus_per_replica: Annotated[float, typer.Option(min=0, help="With --engine ray: GPUs each replica "
                                                    "asks for (use with --device cuda).")] = 0.0,
    cpus_per_replica: Annotated[float, typer.Option(min=0, help="With --engine ray: CPUs each replica "
                                                    "asks for.")] = 1.0,
) -> None:
    """Serve LoRA generation over HTTP; with no --registry, the demo world (its experts built first if
    missing, the rest in the background)."""
    import uvicorn

    from ..api import ApiSettings, create_app

    if engine not in ("plain", "ray"):
        from ..errors import LoragenError

        raise LoragenError(f"--engine must be plain or ray, not {engine!r}")
    overrides: dict[str, Any] = {"host": host, "port": port, "registry": registry, "generator": generator,
                                 "device": device, "max_batch": max_batch, "max_wait_ms": max_wait_ms,
                                 "encoder_dtype": encoder_dtype.value if encoder_dtype else None,
                                 "encoder_workers": encoder_workers, "auth_all_routes": auth_all_routes,
                                 "max_concurrent_requests": max_concurrent_requests,
                                 "max_queued_requests": max_queued_requests, "request_timeout_s": request_timeout_s}
    settings = ApiSettings(**{k: v for k, v in overrides.items() if v is not None})
    if settings.registry is None:
        from ..demo.world import build_demo_experts

        world = build_demo_experts(settings.home)  # idempotent; prints progress while it builds
        typer.echo(f"demo world at {world.root}" + ("" if world.is_built() else
                   " (its multi-task LoRA and generators train in the background; see /readyz)"))
    else:  # a bad path is one line here, not a traceback from the server's startup
        from ..registry import Registry

        Registry.open(settings.registry).close()
    if engine == "ray":
        from .ray_serve_cmds import serve_on_ray

        serve_on_ray(settings, replicas=replicas, address=ray_address, gpus_per_replica=gpus_per_replica,
                     cpus_per_replica=cpus_per_replica)
        return
    typer.echo(f"serving on http://{settings.host}:{settings.port}  (docs at /docs)")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=log_level)
