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
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve LoRA generation over HTTP; with no --registry, the demo world (its experts built first if
    missing, the rest in the background)."""
    import uvicorn

    from ..api import ApiSettings, create_app

    overrides: dict[str, Any] = {"host": host, "port": port, "registry": registry, "generator": generator,
                                 "device": device, "max_batch": max_batch, "max_wait_ms": max_wait_ms,
                                 "encoder_dtype": encoder_dtype.value if encoder_dtype else None,
                                 "encoder_workers": encoder_workers}
    settings = ApiSettings(**{k: v for k, v in overrides.items() if v is not None})
    if settings.registry is None:
        from ..demo.world import build_demo_experts

        world = build_demo_experts(settings.home)  # idempotent; prints progress while it builds
        typer.echo(f"demo world at {world.root}" + ("" if world.is_built() else
                   " (its multi-task LoRA and generators train in the background; see /readyz)"))
    else:  # a bad path is one line here, not a traceback from the server's startup
        from ..registry import Registry

        Registry.open(settings.registry).close()
    typer.echo(f"serving on http://{settings.host}:{settings.port}  (docs at /docs)")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=log_level)
