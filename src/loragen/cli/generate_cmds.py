"""`loragen generate`, `loragen complete`, `loragen demo ...` and `loragen train experts`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from ..config import Settings
from ..errors import LoragenError

demo_app = typer.Typer(no_args_is_help=True, help="The embedded demo world.")
train_app = typer.Typer(no_args_is_help=True, help="Train experts (and, later, generators).")

RegistryOpt = Annotated[Path | None, typer.Option("--registry", help="Registry directory (default: the demo world's).")]


def _registry_path(registry: Path | None) -> Path:
    return registry if registry is not None else Settings().registry_dir


def _example_pair(text: str) -> dict[str, str]:
    """INPUT->OUTPUT, INPUT=>OUTPUT or INPUT→OUTPUT, split at the first arrow. Spaces around the arrow
    are dropped; the sides are otherwise kept as written, since a pair's exact strings are the evidence."""
    arrow = re.search(r"\s*(?:->|=>|→)\s*", text)
    if arrow is None:
        raise LoragenError(f"--example {text!r} is not INPUT->OUTPUT")
    return {"input": text[:arrow.start()], "output": text[arrow.end():]}


def generate(
    description: Annotated[str, typer.Argument(help="What the LoRA should make the model do.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the PEFT adapter.")],
    method: Annotated[str, typer.Option(help="nearest | weighted | topk | uniform | icm | sg")] = "weighted",
    k: Annotated[int, typer.Option("--k", min=1, help="Neighbours for weighted and topk.")] = 4,
    temperature: Annotated[float, typer.Option(min=1e-6, help="Softmax temperature τ.")] = 0.05,
    generator: Annotated[Path | None, typer.Option("--generator", help="Trained generator (icm/sg).")] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Seed for icm/sg sampling.")] = None,
    example: Annotated[list[str] | None, typer.Option("--example", help="An input/output pair as INPUT->OUTPUT "
                       "(or =>, →; repeatable): weighted, icm and sg re-weigh their top-K experts by how well each explains "
                       "the examples; icm also adds its in-context task vector.")] = None,
    registry: RegistryOpt = None,
) -> None:
    """Generate a LoRA for DESCRIPTION and write it as a PEFT adapter."""
    from ..generator import LEARNED_METHODS, check_descriptions, load_generator
    from ..registry import Registry

    check_descriptions([description])
    reg = Registry.open(_registry_path(registry))
    if method in LEARNED_METHODS and generator is None and registry is None:
        generator = Settings().demo_dir / "generators" / method  # the demo world's
    gen = load_generator(method, reg, k=k, temperature=temperature, generator_dir=generator,
                         inline_examples=Settings().inline_examples)
    pairs = [_example_pair(text) for text in example or []]
    lora = gen.generate([description], seed=seed, examples=[pairs] if pairs else None)[0]
    lora.save_pretrained(out)
    flags = "".join(f", {f}" for f in ("ood", "clipped") if lora.metadata.get(f))
    if lora.metadata.get("examples_from_description"):
        flags += ", examples from the description"
    if lora.metadata.get("ambiguous"):
        flags += ", ambiguous: it mixes experts (examples would settle it)"
    if lora.metadata.get("examples_ood"):
        flags += ", no expert explains the examples"
    typer.echo(f"wrote {out} ({method}, rank {lora.spec.rank}, base {lora.spec.base_model}{flags})")
    for n in lora.metadata["neighbours"]:
        evidence = f"  examples log p {n['example_logprob']:.1f}" if n.get("example_logprob") is not None else ""
        typer.echo(f"  {n['expert']:<24} similarity {n['similarity']:.3f}  weight {n['weight']:.3f}{evidence}")
    if lora.metadata.get("examples_fit") is not None:
        typer.echo(f"examples fit {lora.metadata['examples_fit']:.3f} (the best expert's mean probability per output token)")


def complete(
    text: Annotated[str, typer.Argument(help="The input to complete.")],
    adapter: Annotated[Path | None, typer.Option("--adapter", help="PEFT adapter directory to merge.")] = None,
    base: Annotated[Path | None, typer.Option("--base", help="Base model (default: the adapter's).")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, max=4096)] = 32,
) -> None:
    """Run the base model with ADAPTER merged and print the greedy output."""
    from ..adapters import Lora
    from ..basemodel import BaseModel

    lora = Lora.from_pretrained(adapter) if adapter is not None else None
    base_path = base or (Path(lora.spec.base_model) if lora is not None else None)
    if base_path is None:
        raise LoragenError("give --base, or an --adapter whose base_model_name_or_path is a local model")
    model = BaseModel.load(base_path)
    if lora is None:
        typer.echo(model.complete([text], max_new_tokens=max_tokens)[0])
        return
    with lora.merged(model.model):
        typer.echo(model.complete([text], max_new_tokens=max_tokens)[0])


@demo_app.command("build")
def demo_build(force: Annotated[bool, typer.Option(help="Rebuild even if built.")] = False) -> None:
    """Build the demo world under $LORAGEN_HOME/demo (idempotent; a few minutes): the experts, then
    the multi-task LoRA and the generators (continuing a world that has its experts only)."""
    from ..demo.world import build_demo

    world = build_demo(Settings().home, force=force)
    typer.echo(world.manifest.read_text())
    typer.echo(f"demo world ready at {world.root}")


@demo_app.command("run")
def demo_run(
    serve: Annotated[bool, typer.Option("--serve", help="Then serve the demo world, as `loragen serve` does, "
                                        "in this process (no second start-up).")] = False,
    host: Annotated[str | None, typer.Option(help="With --serve: interface to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(min=0, max=65535, help="With --serve: port (default 8000).")] = None,
) -> None:
    """Build the demo world's experts if needed, then show one description -> LoRA -> completion loop
    (with sg too once the whole world is built; `loragen serve` finishes it in the background)."""
    from ..basemodel import BaseModel
    from ..embeddings import TextEncoder
    from ..generator import load_generator
    from ..registry import Registry
    from ..demo.world import build_demo_experts

    encoder = TextEncoder()  # one load for the build and the loop
    world = build_demo_experts(Settings().home, encoder=encoder)
    reg = Registry.open(world.registry, encoder=encoder)
    base = BaseModel.load(world.base_model)
    description = "write the letters of the input in reverse order"
    inputs = ["abcde", "loragen", "hello"]
    built = world.is_built()
    for method in ("nearest", "weighted", "sg") if built else ("nearest", "weighted"):
        gen = load_generator(method, reg, generator_dir=world.generators / method)
        lora = gen.generate([description], seed=0)[0]
        out = world.root / "generated" / method
        lora.save_pretrained(out)
        top = lora.metadata["neighbours"][0]
        typer.echo(f"\n[{method}] {description!r} -> {out}  (top expert {top['expert']}, similarity {top['similarity']:.3f})")
        outs = base.complete(inputs, loras=[lora] * len(inputs))
        plain = base.complete(inputs)
        for x, y, p in zip(inputs, outs, plain):
            typer.echo(f"  {x!r:>12} -> {y!r:<12} (base model alone: {p!r})")
    reg.close()
    if not built:
        typer.echo("\nThe multi-task LoRA and the icm and sg generators are not built yet: `loragen serve` builds "
                   "them in the background and serves them when done (see /readyz); `loragen demo build` builds "
                   "them now.")
    if serve:
        from .serve_cmds import serve as serve_command

        serve_command(host=host, port=port)


def _check_generator_out(out: Path, method: str, *, resume: bool, overwrite: bool) -> None:
    """OUT must be new, empty, or a generator checkpoint of `method` that --resume or --overwrite names:
    a trained generator is never replaced by accident, nor files of something else mixed into it."""
    from ..generator import GenerationError
    from ..generator.persistence import CONFIG_NAME, STATE_NAME, VECTORS_NAME, WEIGHTS_NAME, read_method
    from ..training.generator_task import TASK_STATE_NAME

    if not out.exists():
        return
    if not out.is_dir():
        raise GenerationError(f"--out {out} is a file, not a directory")
    held = {p.name for p in out.iterdir()}
    if not held:
        return
    if not held <= {CONFIG_NAME, WEIGHTS_NAME, VECTORS_NAME, STATE_NAME, TASK_STATE_NAME}:
        raise GenerationError(f"--out {out} holds files that are not a generator's; give a new or empty directory")
    saved = read_method(out) if CONFIG_NAME in held else None
    if saved is not None and saved != method:
        raise GenerationError(f"--out {out} holds a generator of method {saved!r}, not {method!r}; give another directory")
    if not (resume or overwrite):
        raise GenerationError(f"--out {out} already holds a trained {method} generator or its training state: "
                              "--resume continues it, --overwrite replaces it")


@train_app.command("generator")
def train_generator_cmd(
    method: Annotated[str, typer.Option("--method", help="icm | sg")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the trained generator.")],
    registry: RegistryOpt = None,
    epochs: Annotated[int, typer.Option(min=1)] = 60,
    lr: Annotated[float, typer.Option(min=0)] = 3e-3,
    latent: Annotated[int, typer.Option(min=1)] = 256,
    kl_weight: Annotated[float | None, typer.Option(help="Default: icm 0.005, sg 1.0.")] = None,
    patience: Annotated[int, typer.Option(min=1, help="Early stopping patience (epochs).")] = 15,
    holdout: Annotated[str, typer.Option(help="Comma-separated experts to leave out.")] = "",
    resume: Annotated[bool, typer.Option(help="Continue from OUT's training state.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the generator OUT already holds.")] = False,
    examples: Annotated[Path | None, typer.Option("--examples", help="icm: task file whose tasks' training "
                        "instances (by expert name) give in-context task vectors.")] = None,
    train_fraction: Annotated[float, typer.Option(min=0.01, max=1.0, help="With --examples: the part of each "
                              "task's instances used as examples (the experts' train split).")] = 0.7,
    temperature: Annotated[float, typer.Option(min=1e-4, help="Softmax temperature τ of the neighbour "
                           "weights (sg's prior, icm's memory read).")] = 0.05,
    condition_from: Annotated[str | None, typer.Option(help="icm: condition on the description's 'text' "
                              "embedding or on its 'memory' read of the registry. Default: memory where most experts have two "
                              "descriptions or more, else text.")] = None,
    prior_weight: Annotated[float | None, typer.Option(min=0, help="Weight of the decode-from-the-prior term "
                            "(GSNN) of the loss. Default: icm 1.0, sg 0.")] = None,
    self_fraction: Annotated[float | None, typer.Option(min=0, max=1, help="sg: share of training conditions "
                             "built with the expert itself retrievable. Default 0.5.")] = None,
    description_encoder: Annotated[bool, typer.Option(help="Fine-tune the text encoder's top layers on the "
                                   "registry's paraphrases (BERT encoders such as MiniLM).")] = True,
    description_head: Annotated[bool, typer.Option(help="Learn a linear map of the (tuned) encoder's description "
                                "embeddings from the registry's paraphrases.")] = True,
    objective: Annotated[str, typer.Option(help="reconstruction: fit the experts' checkpoints; task: the base "
                         "model's own loss on the registry tasks' training instances (--tasks); mixed: both.")]
    = "reconstruction",
    tasks: Annotated[Path | None, typer.Option("--tasks", help="task/mixed: task file with the registry experts' "
                     "tasks (matched by name); only each task's training split is used.")] = None,
    task_steps: Annotated[int, typer.Option(min=1, help="task/mixed: optimiser steps.")] = 150,
    task_lr: Annotated[float, typer.Option(min=0, help="task/mixed: learning rate.")] = 1e-3,
    reconstruction_weight: Annotated[float, typer.Option(min=0, help="mixed: weight of the reconstruction "
                                     "loss.")] = 1.0,
    residual: Annotated[bool, typer.Option(help="task: decode on top of the registry's multi-task LoRA "
                        "(`loragen train multitask`).")] = False,
    contrast_weight: Annotated[float, typer.Option(min=0, help="task/mixed: weight of a hinge that asks LoRAs from "
                               "a task's own descriptions to beat LoRAs from other families' descriptions on its "
                               "instances (0: off).")] = 0.0,
    contrast_margin: Annotated[float, typer.Option(min=0, help="task/mixed: the hinge's margin (nats).")] = 0.1,
    seed: int = 0,
) -> None:
    """Train an ICM-LoRA or SG-LoRA generator on the registry's experts (or through the task loss)."""
    from ..generator import LEARNED_METHODS, GenerationError, GeneratorConfig
    from ..registry import Registry
    from ..training.generator_task import OBJECTIVES, TaskTrainingConfig, train_generator_for
    from ..training.objective import TaskModel
    from ..training.tasks import read_tasks

    if method not in LEARNED_METHODS:
        raise GenerationError(f"unknown generator method {method!r}; choose icm or sg")
    _check_generator_out(out, method, resume=resume, overwrite=overwrite)
    reg = Registry.open(_registry_path(registry))
    names = [h.strip() for h in holdout.split(",") if h.strip()]
    for name in names:
        reg.get(name)  # an unknown expert is an error, not a silent no-op
    if objective not in OBJECTIVES:
        raise GenerationError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if objective != "reconstruction" and tasks is None:
        raise GenerationError(f"--objective {objective} needs --tasks (the registry tasks' instances)")
    task_list = read_tasks(tasks) if tasks is not None and objective != "reconstruction" else None
    pairs = None
    if examples is not None:
        if method != "icm":
            raise GenerationError("--examples trains ICM-LoRA's task vectors; use it with --method icm")
        pairs = {t.name: t.example_pairs(train_fraction, seed) for t in read_tasks(examples)}
    base = TaskModel.for_registry(reg) if task_list is not None else None
    config = TaskTrainingConfig(steps=task_steps, lr=task_lr, seed=seed, train_fraction=train_fraction,
                                reconstruction_weight=reconstruction_weight if objective == "mixed" else 0.0,
                                contrast_weight=contrast_weight, contrast_margin=contrast_margin)
    settings = GeneratorConfig(method=method, epochs=epochs, lr=lr, latent=latent, kl_weight=kl_weight, seed=seed,
                               patience=patience, holdout=names, temperature=temperature, prior_weight=prior_weight,
                               self_fraction=self_fraction, description_head=description_head,
                               condition_from=condition_from, description_encoder=description_encoder)
    train_generator_for(objective, reg, method, task_list, base, config, residual=residual, out_dir=out,
                        resume=resume, config=settings, examples=pairs, progress=True)
    typer.echo(f"wrote {method} generator ({objective}) to {out}")


@train_app.command("multitask")
def train_multitask_cmd(
    tasks: Annotated[Path, typer.Option("--tasks", help="Task file with the registry experts' tasks (matched by "
                     "name); only each task's training split is used.")],
    registry: RegistryOpt = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimiser steps; each sees every task.")] = 200,
    lr: Annotated[float, typer.Option(min=0)] = 1e-2,
    rows_per_task: Annotated[int, typer.Option(min=1, help="Rows of each task per step.")] = 1,
    train_fraction: Annotated[float, typer.Option(min=0.01, max=1.0, help="The experts' train split.")] = 0.7,
    seed: int = 0,
) -> None:
    """Train one LoRA in the registry's basis on all its tasks, stored as the method `multitask`."""
    from ..registry import Registry
    from ..registry.multitask import save_multitask
    from ..training.multitask import MultitaskConfig, train_multitask
    from ..training.objective import TaskModel
    from ..training.tasks import read_tasks

    task_list = read_tasks(tasks)
    reg = Registry.open(_registry_path(registry))
    config = MultitaskConfig(steps=steps, lr=lr, rows_per_task=rows_per_task, seed=seed, train_fraction=train_fraction)
    lora = train_multitask(reg, task_list, TaskModel.for_registry(reg), config)
    save_multitask(reg, lora)
    typer.echo(f"wrote the multi-task LoRA ({len(lora.metadata['tasks'])} tasks) to {reg.path / 'multitask'}")


@train_app.command("experts")
def train_experts(
    tasks: Annotated[Path, typer.Option("--tasks", help="Task file (JSONL).")],
    registry: Annotated[Path, typer.Option("--registry", help="Registry directory (created if missing).")],
    base: Annotated[Path | None, typer.Option("--base", help="Base model directory (HF format); "
                    "default: the packaged all-MiniLM-L6-v2 encoder (label-scoring tasks).")] = None,
    targets: Annotated[str | None, typer.Option(help="Comma-separated target modules (default: PEFT's).")] = None,
    rank: Annotated[int, typer.Option(min=1)] = 8,
    steps: Annotated[int, typer.Option(min=1)] = 300,
    lr: Annotated[float, typer.Option(min=0)] = 1e-2,
    rows_per_task: Annotated[int, typer.Option(min=1)] = 8,
    checkpoints: Annotated[int, typer.Option(min=1, help="Keep the last M checkpoints.")] = 5,
    seed: int = 0,
    basis_lr: Annotated[float | None, typer.Option(min=0, help="A new registry only: its founding experts "
                                                   "learn the shared basis too, at this learning rate.")] = None,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Causal LMs: train in this many one-thread "
                                         "processes (data-parallel).")] = 1,
) -> None:
    """Train one expert per task in the registry's shared basis (only B) and register them.

    A causal LM learns input -> output text; an encoder learns label scoring (the task's labels).
    """
    from ..adapters import Basis, spec_from_config
    from ..embeddings import TextEncoder, default_model_path
    from ..registry import Registry
    from ..training.experts import ExpertConfig
    from ..training.tasks import read_tasks

    task_list = read_tasks(tasks)
    base = base or default_model_path()
    reg = Registry.open(registry) if (registry / "registry.sqlite").exists() else None
    if reg is not None:
        spec, basis = reg.spec, reg.basis
        clash = [t.name for t in task_list if t.name in {e.name for e in reg.experts()}]
        if basis_lr is not None:
            raise LoragenError("--basis-lr learns a new registry's basis; this registry's basis is fixed")
        if clash:
            raise LoragenError(f"the registry already has experts named {', '.join(clash[:5])}")
    else:  # the registry is created only once training succeeded
        spec = spec_from_config(base, targets=targets.split(",") if targets else None, rank=rank,
                                base_model=str(base.resolve()))
        basis = Basis.seeded(spec, seed)
    every = max(1, steps // (4 * checkpoints))
    config = ExpertConfig(steps=steps, lr=lr, rows_per_task=rows_per_task, checkpoints=min(checkpoints, steps),
                          checkpoint_every=every, seed=seed, basis_lr=basis_lr, workers=workers)
    if spec.task_type == "CAUSAL_LM":
        from ..basemodel import BaseModel
        from ..training.causal import train_causal_experts

        runs = train_causal_experts(BaseModel.load(base), basis, task_list, config)
    else:
        from ..encoder import EncoderModel
        from ..training.classify import train_classifier_experts

        runs = train_classifier_experts(EncoderModel.load(base), basis, task_list, config)
    if reg is None:
        reg = Registry.create(registry, spec, encoder=TextEncoder(), basis=runs[0].basis if runs else basis)
    for run in runs:
        reg.add_expert(run.task.name, run.checkpoints, run.task.descriptions, metrics=run.metrics)
        typer.echo(f"{run.task.name}: " + ", ".join(f"{k} {v:.3f}" for k, v in run.metrics.items()))
