"""`loragen serve --engine ray`: deploy on Ray Serve, wait until every replica runs, serve until Ctrl-C."""

from __future__ import annotations

import signal
import time
from types import FrameType

import typer

from ..api.ray_serve import RayServeOptions, deploy, import_ray, undeploy
from ..api.settings import ApiSettings


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def serve_on_ray(settings: ApiSettings, *, replicas: int, address: str | None, gpus_per_replica: float,
                 cpus_per_replica: float) -> None:
    ray = import_ray()  # a missing Ray is one line, before anything starts
    options = RayServeOptions(replicas=replicas, address=address, gpus_per_replica=gpus_per_replica,
                              cpus_per_replica=cpus_per_replica)
    typer.echo(f"deploying {replicas} replica(s) on Ray Serve ...")
    url = deploy(settings, options)
    typer.echo(f"serving on {url}  ({replicas} replica(s); docs at /docs); Ctrl-C stops it")
    signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop undeploys as Ctrl-C does
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        undeploy()
        ray.shutdown()  # a local Ray started for this command stops with it
