"""`loragen bench`: decode (fused vs naive decoding) and cls (the cls-tasks benchmark); serve lives in bench_serve_cmds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(no_args_is_help=True, help="Speed benchmarks.")


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def table(report: dict[str, Any]) -> str:
    dev = report["device"]
    lines = [f"{report['model_config']}: {report['spec']['tokens_per_lora']} tokens, "
             f"{report['spec']['params_per_lora']:,} B params per LoRA (rank {report['spec']['rank']}); "
             f"{dev['name']} ({dev['type']}, {report['dtype']}, {dev['torch_threads']} threads)"]
    ceil = report["ceilings"]
    if ceil:
        lines.append(f"ceilings: matmul {_si(ceil['matmul_flop_per_s'])}FLOP/s, copy {_si(ceil['copy_bytes_per_s'])}B/s")
    head = f"{'batch':>6} {'fused ms':>10} {'fused LoRA/s':>13} {'naive LoRA/s':>13} {'ratio':>7} {'FLOP/s':>9} {'B/s est':>9}"
    has_compiled = any("compiled" in r for r in report["results"])
    if has_compiled:
        head += f" {'compiled ms':>12} {'vs fused':>9}"
    has_e2e = any("end_to_end" in r for r in report["results"])
    if has_e2e:
        head += f" {'e2e ms':>9} {'e2e LoRA/s':>11}"
    lines.append(head)
    for r in report["results"]:
        f, n = r["fused"], r["naive"]
        line = (f"{r['batch']:>6} {f['ms_per_batch']:>10.2f} {f['loras_per_s']:>13.1f} {n['loras_per_s']:>13.2f}"
                f" {r['speedup']:>6.1f}x {_si(f['flop_per_s']):>9} {_si(f['bytes_per_s_estimate']):>9}")
        if "compiled" in r and "error" in r["compiled"]:
            line += f" {'failed':>12} {'':>9}"
        elif "compiled" in r:
            line += f" {r['compiled']['ms_per_batch']:>12.2f} {r['compiled']['speedup_over_eager']:>8.2f}x"
        if "end_to_end" in r:
            e = r["end_to_end"]
            line += f" {e['ms_per_batch']:>9.2f} {e['loras_per_s']:>11.1f}"
        lines.append(line)
    for r in report["results"]:
        if "error" in r.get("compiled", {}):
            lines.append(f"torch.compile failed at batch {r['batch']}: {r['compiled']['error']}")
    if any(r["naive"]["extrapolated"] for r in report["results"]):
        lines.append(f"naive timed on at most {report['naive_max_requests']} requests per batch, extrapolated per LoRA")
    return "\n".join(lines)


@app.command("decode")
def decode(
    model_config: Annotated[str, typer.Option("--model-config", help="llama-3-8b | qwen2.5-0.5b | mistral-7b, "
                                              "or a config.json / model directory.")] = "llama-3-8b",
    rank: Annotated[int, typer.Option(min=1)] = 8,
    targets: Annotated[str, typer.Option(help="Comma-separated target modules.")] = "q_proj,v_proj",
    batch: Annotated[str, typer.Option("--batch", help="Comma-separated batch sizes.")] = "1,8,64,256",
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on cuda, fp32 on cpu) | fp32 | bf16 | fp16")] = "auto",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full report here.")] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs per measurement (median).")] = 5,
    hidden: Annotated[int, typer.Option(min=1, help="Decoder width.")] = 512,
    latent: Annotated[int, typer.Option(min=1)] = 256,
    naive_max: Annotated[int, typer.Option(min=1, help="Time the naive loop on at most this many requests.")] = 8,
    registry_size: Annotated[int, typer.Option(min=1, help="Experts in the FAISS index (end to end).")] = 1000,
    end_to_end: Annotated[bool, typer.Option(help="Also time encoding + retrieval + decode.")] = True,
    encoder: Annotated[str | None, typer.Option(help="Text encoder directory for end to end "
                                                "(default: the packaged all-MiniLM-L6-v2).")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads (default: torch's).")] = None,
    compile_: Annotated[bool, typer.Option("--compile", help="Also time torch.compile of the fused decoder "
                                           "(CUDA graphs on cuda).")] = False,
    seed: int = 0,
) -> None:
    """Time the fused decoder against a Text-to-LoRA-style loop, per batch size."""
    import torch

    from ..adapters import spec_from_config
    from ..adapters.known_configs import resolve_model_config
    from ..bench.decode import BenchConfig, check_config, parse_batches, run_benchmark

    cfg = BenchConfig(batches=parse_batches(batch), device=device, dtype=dtype, repeats=repeats, hidden=hidden,
                      latent=latent, naive_max=naive_max, registry_size=registry_size, end_to_end=end_to_end,
                      encoder=encoder, compile=compile_, seed=seed)
    check_config(cfg)  # before the (slow) spec, so bad flags fail fast
    if threads is not None:
        torch.set_num_threads(threads)
    names = [t.strip() for t in targets.split(",") if t.strip()]
    spec = spec_from_config(resolve_model_config(model_config), targets=names, rank=rank, base_model=model_config)
    report = run_benchmark(spec, cfg, model_config=model_config, log=lambda s: typer.echo(s, err=True))
    typer.echo(table(report))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2) + "\n")
        typer.echo(f"wrote {json_out}")


@app.command("cls")
def cls(
    data: Annotated[Path, typer.Option("--data", help="A cls-tasks directory or tasks.jsonl (any file in that format).")],
    out: Annotated[Path, typer.Option("--out", help="Where report.{json,md,png}, bench.json and generators go.")],
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    cache: Annotated[Path | None, typer.Option(help="Expert cache directory, shared between runs "
                                               "(default: OUT/experts).")] = None,
    base: Annotated[Path | None, typer.Option(help="Encoder directory (default: the packaged all-MiniLM-L6-v2).")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Expert training steps.")] = 80,
    rows_per_task: Annotated[int, typer.Option(min=1)] = 4,
    checkpoints: Annotated[int, typer.Option(min=1, help="M: checkpoints kept per expert.")] = 5,
    rank: Annotated[int, typer.Option(min=1)] = 8,
    epochs: Annotated[int, typer.Option(min=1, help="Generator training epochs.")] = 60,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="K: neighbours for topk/weighted/sg.")] = 4,
    temperature: Annotated[float, typer.Option(min=1e-6, help="τ of the softmax over similarities.")] = 0.05,
    latent: Annotated[int, typer.Option(min=1)] = 256,
    kl_icm: Annotated[float | None, typer.Option(min=0, help="KL weight of icm (default 0.005).")] = None,
    kl_sg: Annotated[float | None, typer.Option(min=0, help="KL weight of sg (default 1.0).")] = None,
    labels_in_description: Annotated[bool, typer.Option(help="Append the label set to descriptions.")] = True,
    examples: Annotated[str, typer.Option(help="icm+N examples: comma-separated pairs per request ('' or 0: off).")] = "4,16",
    generators: Annotated[str, typer.Option(help="Generators to train, comma-separated method:objective[+derived]"
                          "[+contrast][+plain] (objective reconstruction, task or mixed; +derived: also one-vs-rest "
                          "tasks derived from the train tasks; +contrast: the own-versus-mismatched description "
                          "hinge; +plain: task objective without the multi-task residual).")]
    = "icm:reconstruction,sg:reconstruction,icm:task,sg:task",
    multitask_steps: Annotated[int, typer.Option(min=1, help="Multi-task LoRA training steps.")] = 100,
    task_steps: Annotated[int, typer.Option(min=1, help="Task-loss training steps of each generator.")] = 150,
    task_lr: Annotated[float, typer.Option(min=0, help="Task-loss learning rate.")] = 1e-3,
    contrast_weight: Annotated[float, typer.Option(min=0, help="+contrast: weight of the hinge.")] = 1.0,
    contrast_margin: Annotated[float, typer.Option(min=0, help="+contrast: margin of the hinge (nats).")] = 0.1,
    train_controls: Annotated[bool, typer.Option(help="Also score the controls on the train tasks.")] = False,
    seed: int = 0,
) -> None:
    """Train experts, a multi-task LoRA and the generators on the train split, and score every method."""
    from ..bench.cls import ClsBenchConfig, ClsBenchError, run_cls_bench
    from ..bench.cls import Variant

    chosen = tuple(Variant.parse(g).name for g in generators.split(",") if g.strip())
    try:
        shots = tuple(int(n) for n in examples.split(",") if n.strip())
    except ValueError:
        raise ClsBenchError(f"--examples takes comma-separated integers, not {examples!r}") from None

    if device not in ("cpu", "cuda"):
        raise ClsBenchError(f"unknown device {device!r}; choose cpu or cuda")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ClsBenchError("--device cuda was asked for but CUDA is not available here")
    cfg = ClsBenchConfig(steps=steps, rows_per_task=rows_per_task, checkpoints=checkpoints, rank=rank,
                         generator_epochs=epochs, top_k=k, temperature=temperature, latent=latent,
                         kl_weight_icm=kl_icm, kl_weight_sg=kl_sg, labels_in_description=labels_in_description,
                         examples_per_request=tuple(n for n in shots if n > 0), generators=chosen,
                         multitask_steps=multitask_steps, task_steps=task_steps, task_lr=task_lr,
                         contrast_weight=contrast_weight, contrast_margin=contrast_margin, train_controls=train_controls, seed=seed, device=device)
    out.mkdir(parents=True, exist_ok=True)
    bench = run_cls_bench(data, out, cfg, cache=cache, base=base, log=lambda s: typer.echo(s, err=True))
    typer.echo((out / "report.md").read_text())
    typer.echo((out / "transfer.md").read_text())
    typer.echo(f"total {bench['timings']['total_s']:.0f} s; wrote {out}/report.json, report.md, report.png, bench.json")


def _register_serve() -> None:
    from .bench_serve_cmds import serve_bench

    app.command("serve")(serve_bench)


_register_serve()
