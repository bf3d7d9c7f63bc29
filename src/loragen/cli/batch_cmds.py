"""`loragen batch`: generate (and optionally evaluate) one adapter per (input line, method)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..config import Settings
from ..errors import LoragenError


def batch(
    input: Annotated[Path, typer.Argument(help="JSONL: {id, description, examples?, instances?} or task-file lines.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory: adapters/, manifest.jsonl, report.*")],
    method: Annotated[str, typer.Option("--method", help="Comma-separated: nearest, weighted, topk, uniform, "
                                        "icm, sg.")] = "weighted",
    generator: Annotated[list[Path] | None, typer.Option(
        "--generator", help="An icm/sg checkpoint, or a folder holding icm/ and sg/ ones; repeatable. "
        "Default with the demo registry: its generators.")] = None,
    registry: Annotated[Path | None, typer.Option(
        "--registry", help="Registry directory (default: the demo world's).")] = None,
    evaluate: Annotated[bool, typer.Option(
        "--eval", help="Score items with instances; write report.json/md/png.")] = False,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Items per chunk.")] = 256,
    k: Annotated[int, typer.Option("--k", min=1, help="Neighbours for weighted and topk.")] = 4,
    temperature: Annotated[float, typer.Option(min=1e-6, help="Softmax temperature τ of weighted.")] = 0.05,
    seed: Annotated[int, typer.Option(help="Seed for icm/sg sampling and the control texts.")] = 0,
    train_fraction: Annotated[float, typer.Option(min=0.0, max=1.0, help="Task-file lines: the share of "
                              "instances kept for training; the rest are evaluated.")] = 0.7,
    max_eval_instances: Annotated[int | None, typer.Option(
        min=1, help="Evaluate at most N instances per item.")] = None,
    engine: Annotated[str, typer.Option(help="local: this process; ray: a Ray Data actor pool "
                                        "(pip install 'loragen\\[ray]').")] = "local",
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", help="With --engine ray: the cluster (auto, ray://HOST:10001); default: a local "
        "Ray started for this run.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="With --engine ray: actors, each loading the "
                                         "generators once.")] = 1,
    gpus_per_worker: Annotated[float, typer.Option(min=0, help="With --engine ray: GPUs per actor "
                                                   "(use with --device cuda).")] = 0.0,
) -> None:
    """Generate every (item, method) adapter not yet in OUT/manifest.jsonl. Exit code: failed items (≤ 255)."""
    from ..batch import BatchConfig, run_batch
    from ..batch.loading import generator_dirs
    from ..generator import METHODS

    methods = [m.strip() for m in method.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise LoragenError(f"unknown method {', '.join(map(repr, unknown)) or '(none given)'}; "
                           f"choose from {', '.join(METHODS)}")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise LoragenError(f"--device must be cpu or cuda, not {device!r}")
    if engine not in ("local", "ray"):
        raise LoragenError(f"--engine must be local or ray, not {engine!r}")
    runner = None
    if engine == "ray":
        from ..batch.ray_engine import RayEngine, import_ray

        import_ray()  # a missing Ray is one line before anything runs
        runner = RayEngine(address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker)
    settings = Settings()
    paths = list(generator or [])
    if not paths and registry is None and (settings.demo_dir / "generators").is_dir():
        paths = [settings.demo_dir / "generators"]  # the demo world's icm/ and sg/
    config = BatchConfig(input=input, out=out, registry=registry or settings.registry_dir, methods=methods,
                         generators=generator_dirs(paths), device=device, batch_size=batch_size, seed=seed, k=k,
                         temperature=temperature, evaluate=evaluate, train_fraction=train_fraction,
                         max_eval_instances=max_eval_instances)
    try:
        summary = run_batch(config, engine=runner)
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted: finished chunks are in {out / 'manifest.jsonl'}; run the same command "
                   "again to resume", err=True)
        raise
    if summary.report is not None:
        typer.echo((out / "report.md").read_text())
        typer.echo(f"wrote {out / 'report.json'}, report.md, report.png")
    elif evaluate:
        typer.echo("no item has instances; nothing to evaluate")
    typer.echo(summary.line())
    if summary.exit_code:
        raise typer.Exit(summary.exit_code)
