"""`loragen bench serve`: closed-loop load on the API over loopback, micro-batching on and off."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from .serve_cmds import EncoderDtype


def serve_table(report: dict[str, Any]) -> str:
    """One row per (case, concurrency); each server's req/s, p50, p99 and errors side by side."""
    labels = [s["label"] for s in report["servers"]]
    by = {(r["server"], r["case"], r["concurrency"]): r for r in report["results"]}
    head = f"{'case':<12} {'conc':>4}"
    for label in labels:
        head += f" | {label[:10]:>10} req/s {'p50 ms':>7} {'p99 ms':>7} {'err':>4} {'batch':>5} {'hit':>4}"
    lines = [head]
    keys = sorted({(r["case"], r["concurrency"]) for r in report["results"]},
                  key=lambda k: (report["cases"].index(k[0]), k[1]))
    for case, n in keys:
        line = f"{case:<12} {n:>4}"
        for label in labels:
            r = by.get((label, case, n))
            if r is None:
                line += f" | {'-':>16} {'':>7} {'':>7} {'':>4} {'':>5} {'':>4}"
                continue
            fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
            line += (f" | {r['req_per_s']:>16.1f} {fmt(r['p50_ms'], '.1f'):>7} {fmt(r['p99_ms'], '.1f'):>7} "
                     f"{r['errors']:>4} {fmt(r['mean_batch'], '.1f'):>5} {fmt(r['cache_hit_fraction'], '.0%'):>4}")
        lines.append(line)
    cpu = ", ".join(f"{r['server']} {r['case']} c={r['concurrency']}: client {r['client_cpu']:.2f}"
                    + (f" server {r['server_cpu']:.2f}" if r["server_cpu"] is not None else "")
                    for r in report["results"] if r["concurrency"] == max(report["concurrency"]))
    lines.append(f"CPU (cores busy) at the highest concurrency: {cpu}")
    target = report.get("target")
    if target:
        lines.append(f"target ({target['what']}): {'met' if target['met'] else 'NOT met'} ({target['measured']})")
    return "\n".join(lines)


TARGET = {"case": "loras-json", "concurrency": 32, "req_per_s": 200.0, "p99_ms": 100.0}


def _target(results: list[dict[str, Any]], server: str) -> dict[str, Any] | None:
    row = next((r for r in results if r["server"] == server and r["case"] == TARGET["case"]
                and r["concurrency"] == TARGET["concurrency"]), None)
    if row is None:
        return None
    met = row["req_per_s"] >= TARGET["req_per_s"] and (row["p99_ms"] or 1e9) < TARGET["p99_ms"] and not row["errors"]
    return {"what": f"{server}: >= {TARGET['req_per_s']:.0f} req/s for {TARGET['case']} at {TARGET['concurrency']} "
                    f"clients, p99 < {TARGET['p99_ms']:.0f} ms, no errors", "met": met,
            "measured": f"{row['req_per_s']} req/s, p99 {row['p99_ms']} ms, {row['errors']} errors"}


def serve_bench(
    url: Annotated[list[str] | None, typer.Option("--url", help="A running server to load (repeatable). "
                                                  "Default: start two on the demo world, micro-batching on "
                                                  "and off.")] = None,
    url_unbatched: Annotated[str | None, typer.Option("--url-unbatched", help="A running server with "
                                                      "micro-batching off (max_batch=1), benched beside --url.")] = None,
    concurrency: Annotated[str, typer.Option(help="Comma-separated numbers of concurrent clients.")] = "1,8,32",
    seconds: Annotated[float, typer.Option(min=0.1, help="Measured seconds per case and level.")] = 20.0,
    warmup: Annotated[float, typer.Option(min=0, help="Unmeasured seconds before each level.")] = 1.0,
    cases: Annotated[str, typer.Option(help="Comma-separated: loras-json, loras-zip, completions.")] =
        "loras-json,loras-zip,completions",
    max_tokens: Annotated[int, typer.Option(min=1, max=256, help="Tokens per completion.")] = 8,
    max_wait_ms: Annotated[float | None, typer.Option(min=0, help="Micro-batch wait of the started "
                                                      "batching server.")] = None,
    registry: Annotated[Path | None, typer.Option("--registry", help="Registry for the started servers "
                                                  "(default: the demo world).")] = None,
    encoder_dtype: Annotated[EncoderDtype | None, typer.Option(help="Text encoder dtype of the started "
                                                               "servers (default auto).")] = None,
    encoder_workers: Annotated[int | None, typer.Option(min=1, max=64, help="Text encoder workers of the started "
                                                        "servers (default 2).")] = None,
    method: Annotated[str | None, typer.Option(help="Generation method of every request (default: the "
                                               "server's, weighted).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full report here.")] = None,
) -> None:
    """Load servers on loopback: req/s, p50/p99 latency and errors per case, micro-batching on and off."""
    import asyncio
    import datetime
    import shlex
    import sys

    from ..bench.loadtest import CASE_NAMES, bench_server, machine, parse_levels
    from ..generator import METHODS
    from .local_server import local_server

    try:
        levels = parse_levels(concurrency)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--concurrency") from None
    names = [c.strip() for c in cases.split(",") if c.strip()]
    unknown = sorted(set(names) - set(CASE_NAMES))
    if unknown or not names:
        raise typer.BadParameter(f"unknown case(s) {', '.join(unknown) or '(none given)'}; choose from "
                                 f"{', '.join(CASE_NAMES)}", param_hint="--cases")
    if method is not None and method not in METHODS:
        raise typer.BadParameter(f"unknown method {method!r}; choose from {', '.join(METHODS)}",
                                 param_hint="--method")
    log = lambda s: typer.echo(s, err=True)  # noqa: E731
    results: list[dict[str, Any]] = []
    servers: list[dict[str, Any]] = []

    def bench(hint: str, target: str, cpu: Any = None) -> None:
        info = _server_info(target)
        label = _label(hint, info, [s["label"] for s in servers])
        servers.append({"label": label, "url": target, **info})
        rows = asyncio.run(bench_server(target, concurrency=levels, seconds=seconds, case_names=names,
                                        warmup_s=warmup, max_tokens=max_tokens, server_cpu=cpu, method=method,
                                        log=log))
        results.extend({"server": label, **r.model_dump()} for r in rows)

    if url or url_unbatched:
        for i, u in enumerate(url or []):
            bench(f"server{i + 1}", u)
        if url_unbatched:
            bench("unbatched", url_unbatched)
    else:
        for label, batch, wait in (("batched", None, max_wait_ms), ("unbatched", 1, None)):
            log(f"starting a server with micro-batching {'off' if batch == 1 else 'on'} ...")
            with local_server(max_batch=batch, max_wait_ms=wait, registry=registry,
                              encoder_dtype=encoder_dtype.value if encoder_dtype else None,
                              encoder_workers=encoder_workers) as srv:
                bench(label, srv.url, srv.cpu_seconds)
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["loragen", *sys.argv[1:]]),
        "machine": machine(), "concurrency": levels, "seconds": seconds, "warmup_s": warmup, "cases": names,
        "max_tokens": max_tokens, "method": method, "servers": servers, "results": results,
        "note": "the load generator runs on the same machine as the servers; client_cpu and server_cpu are "
                "CPU seconds per wall second (1.0 = one core busy)",
    }
    report["target"] = _target(results, servers[0]["label"])
    typer.echo(serve_table(report))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2) + "\n")
        typer.echo(f"wrote {json_out}")


def _label(hint: str, info: dict[str, Any], taken: list[str]) -> str:
    """Batched or unbatched, from the max_batch the server reports on /readyz, else `hint`; unique."""
    if "max_batch" in info:
        hint = "unbatched" if info["max_batch"] == 1 else "batched"
    label, n = hint, 2
    while label in taken:
        label, n = f"{hint}{n}", n + 1
    return label


def _server_info(url: str) -> dict[str, Any]:
    """What the server says about itself on /readyz (its micro-batching settings), if anything."""
    import httpx

    try:
        body = httpx.get(f"{url.rstrip('/')}/readyz", timeout=10).json()
    except (httpx.HTTPError, ValueError):
        return {}
    return {k: body[k] for k in ("max_batch", "max_wait_ms", "encoder_dtype", "encoder_workers") if isinstance(body, dict) and k in body}
