"""`loragen eval demo`: every method's exact match on the demo world."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..config import Settings

app = typer.Typer(no_args_is_help=True, help="Evaluate generation methods.")


@app.command("demo")
def eval_demo(
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full report here.")] = None,
    test_per_task: Annotated[int, typer.Option(min=1)] = 100,
    seed: int = 0,
) -> None:
    """Exact match of base, uniform, nearest, weighted, icm, sg, oracle and the random control."""
    from ..bench.demo_eval import evaluate_demo, markdown_table, write_json
    from ..demo.world import build_demo, ensure_holdout_generators

    world = build_demo(Settings().home)
    ensure_holdout_generators(world)
    report = evaluate_demo(world, test_per_task=test_per_task, seed=seed)
    typer.echo(markdown_table(report))
    if json_out is not None:
        write_json(report, json_out)
        typer.echo(f"wrote {json_out}")
