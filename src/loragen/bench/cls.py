"""`loragen bench cls`: the real-data question on cls-tasks (DESIGN §6), end to end.

1. Each task's instances are split into train and test deterministically.
2. One label-scoring expert per task on the real all-MiniLM-L6-v2, in one shared basis. Experts of
   `train` tasks form the registry; experts of every other split are kept apart as oracles only.
3. A multi-task LoRA is trained on all registry tasks' training instances and stored in the
   registry (method `multitask`, the baseline a generator must beat).
4. ICM-LoRA and SG-LoRA are trained on that registry under each objective asked for
   (`reconstruction`, `task`, `mixed`; `training/generator_task.py`); their rows are `icm:task` etc.
5. Every method is scored on the held-out tasks' test instances (zero-shot) and on the train tasks'
   test instances with their own descriptions. On held-out tasks each learned method also runs
   with two controls: `mismatched(m)`, the description of another held-out task from another
   family, and `random(m)`, unrelated text. `icm+N examples` gives ICM-LoRA N input/output pairs
   from the task's training split (few-shot, not zero-shot).
6. `transfer.md`/`bench.json` give, per method and split, the share of the oracle's gain and the
   margins over `multitask` and over `mismatched(m)`, with 90 % bootstrap intervals over tasks.

Experts and the multi-task LoRA are cached by the task file's content and their settings, so runs
that change only generator settings reuse them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..adapters import Basis, Lora, atomic, spec_from_config
from ..embeddings import TextEncoder, default_model_path
from ..encoder import EncoderModel, accuracy
from ..errors import LoragenError
from ..evaluation.controls import mismatched_index, unrelated_description
from ..evaluation.report import write_report
from ..evaluation.transfer import markdown_table, transfer_table
from ..generator import LearnedGenerator, MultitaskGenerator, RetrievalGenerator
from ..generator.task_vector import TaskVectors
from ..registry import Registry
from ..registry.multitask import has_multitask, load_multitask, save_multitask
from ..training.classify import train_classifier_experts
from ..training.derive import derived_tasks
from ..training.experts import ExpertConfig
from ..training.generator_task import OBJECTIVES, TaskTrainingConfig, train_generator_for
from ..training.multitask import MultitaskConfig, train_multitask
from ..training.objective import TaskModel
from ..training.tasks import Task, read_tasks

RETRIEVAL = ("uniform", "nearest", "topk", "weighted")
LEARNED = ("icm", "sg")


class ClsBenchError(LoragenError, ValueError):
    """The cls benchmark cannot run as asked."""


@dataclass
class ClsBenchConfig:
    train_fraction: float = 0.7
    rank: int = 8
    targets: tuple[str, ...] = ("query", "key", "value")
    steps: int = 80
    rows_per_task: int = 4
    lr: float = 1e-2
    checkpoints: int = 5
    labels_in_description: bool = True  # a user states the label set with the task
    examples_per_request: tuple[int, ...] = (4, 16)  # icm+N examples: pairs from the task's train split
    generator_epochs: int = 60
    # Generators to train, each `method:objective[+derived][+plain]` (`Variant`)
    generators: tuple[str, ...] = ("icm:reconstruction", "sg:reconstruction", "icm:task", "sg:task")
    multitask_steps: int = 100
    multitask_rows: int = 1  # rows of every task per multi-task step
    task_steps: int = 150  # task-loss training (TaskTrainingConfig)
    task_lr: float = 1e-3
    tasks_per_step: int = 8
    task_rows: int = 4
    validation_tasks: float = 0.15
    contrast_weight: float = 1.0  # `+contrast` generators: the hinge's weight and margin (TaskTrainingConfig)
    contrast_margin: float = 0.1
    train_controls: bool = False  # also score the controls on the train tasks (slower)
    top_k: int = 4
    temperature: float = 0.05
    latent: int = 256
    kl_weight_icm: float | None = None  # None: the method's default (icm 0.005, sg 1.0)
    kl_weight_sg: float | None = None
    seed: int = 0
    device: str = "cpu"

    def expert_key(self, data: bytes, base: str) -> str:
        fields = (self.train_fraction, self.rank, self.targets, self.steps, self.rows_per_task, self.lr,
                  self.checkpoints, self.labels_in_description, self.seed, base)
        return hashlib.sha256(data + json.dumps(fields).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Variant:
    """One generator of the benchmark: `method:objective`, then flags for the task objective:
    `+derived` also trains on one-vs-rest tasks derived from multi-class train tasks, `+contrast`
    adds the own-versus-mismatched description hinge, `+plain` is not residual over the multi-task
    LoRA (which a task-objective generator is by default)."""

    method: str
    objective: str
    derived: bool = False
    residual: bool = False
    contrast: bool = False

    @classmethod
    def parse(cls, text: str) -> Variant:
        head, *flags = text.strip().split("+")
        method, _, objective = head.partition(":")
        if method not in ("icm", "sg") or objective not in OBJECTIVES or set(flags) - set(VARIANT_FLAGS):
            raise ClsBenchError(f"generator {text!r}: write method:objective[+derived][+contrast][+plain] with method "
                                f"icm or sg and objective one of {', '.join(OBJECTIVES)}")
        if objective != "task" and flags:
            raise ClsBenchError(f"generator {text!r}: +{flags[0]} applies to the task objective")
        return cls(method, objective, "derived" in flags, objective == "task" and "plain" not in flags,
                   "contrast" in flags)

    @property
    def name(self) -> str:
        plain = self.objective == "task" and not self.residual
        return (f"{self.method}:{self.objective}" + ("+derived" if self.derived else "")
                + ("+contrast" if self.contrast else "") + ("+plain" if plain else ""))


VARIANT_FLAGS = ("derived", "contrast", "plain")


def describe(task: Task, text: str, with_labels: bool) -> str:
    """The description a generator sees; with the label set appended, since symbolic labels
    (`0`/`1`, `E`/`C`/`N`) only mean something next to their definition."""
    return f"{text} Labels: {', '.join(task.labels or [])}." if with_labels else text


def load_tasks(path: Path) -> list[Task]:
    if not path.exists():
        raise ClsBenchError(f"no data at {path}")
    file = path / "tasks.jsonl" if path.is_dir() else path
    tasks = read_tasks(file)
    unlabelled = [t.name for t in tasks if not t.labels]
    if unlabelled:
        raise ClsBenchError(f"label scoring needs 'labels' on every task; missing for {', '.join(unlabelled[:5])}")
    if not any(t.split == "train" for t in tasks):
        raise ClsBenchError(f"{file} has no task with split 'train' to build the registry from")
    return tasks


# ------------------------------------------------------------------------ experts

def build_experts(tasks: list[Task], cache: Path, cfg: ClsBenchConfig, encoder: EncoderModel,
                  text_model: str | None, say: Callable[[str], None]) -> tuple[Registry, Registry | None]:
    """(registry of train-split experts, oracle registry of the others), trained once per cache dir.
    `text_model` embeds the descriptions (None: the packaged all-MiniLM-L6-v2)."""
    done = cache / "experts.json"
    if done.is_file():
        say(f"experts: cached in {cache}")
        return Registry.open(cache / "registry"), Registry.open(cache / "oracle") if (cache / "oracle").exists() else None
    if cache.exists():
        shutil.rmtree(cache)  # a run interrupted before it finished
    spec = spec_from_config(Path(encoder.path), targets=list(cfg.targets), rank=cfg.rank, base_model=encoder.path)
    basis = Basis.seeded(spec, cfg.seed)
    every = max(1, cfg.steps // (4 * cfg.checkpoints))
    config = ExpertConfig(steps=cfg.steps, lr=cfg.lr, rows_per_task=cfg.rows_per_task, checkpoints=cfg.checkpoints,
                          checkpoint_every=every, seed=cfg.seed, train_fraction=cfg.train_fraction)
    t0 = time.perf_counter()
    runs = train_classifier_experts(encoder, basis, tasks, config)
    say(f"experts: {len(runs)} trained in {time.perf_counter() - t0:.0f} s")
    text = TextEncoder(text_model, device=cfg.device)
    registry = Registry.create(cache / "registry", spec, encoder=text, basis=basis)
    oracle = None
    for run in runs:
        descs = [describe(run.task, d, cfg.labels_in_description) for d in run.task.descriptions]
        if run.task.split == "train":
            registry.add_expert(run.task.name, run.checkpoints, descs, metrics=run.metrics)
        else:
            oracle = oracle or Registry.create(cache / "oracle", spec, encoder=text, basis=basis)
            oracle.add_expert(run.task.name, run.checkpoints, descs, metrics=run.metrics)
    done.write_text(json.dumps({"tasks": len(runs), "seconds": round(time.perf_counter() - t0, 1),
                                "config": asdict(cfg)}, indent=2) + "\n")
    return registry, oracle


def build_multitask(registry: Registry, tasks: list[Task], cfg: ClsBenchConfig, encoder: EncoderModel,
                    say: Callable[[str], None]) -> None:
    """The registry's multi-task LoRA, trained once per setting (kept in the cached registry)."""
    config = MultitaskConfig(steps=cfg.multitask_steps, rows_per_task=cfg.multitask_rows, seed=cfg.seed,
                             train_fraction=cfg.train_fraction)
    if has_multitask(registry) and load_multitask(registry).metadata.get("config") == asdict(config):
        say("multitask: cached in the registry")
        return
    t0 = time.perf_counter()
    lora = train_multitask(registry, [t for t in tasks if t.split == "train"], TaskModel("classify", encoder), config)
    lora.metadata["config"] = asdict(config)
    save_multitask(registry, lora)
    say(f"multitask: trained in {time.perf_counter() - t0:.0f} s")


def build_generators(registry: Registry, tasks: list[Task], out: Path, cfg: ClsBenchConfig, encoder: EncoderModel,
                     say: Callable[[str], None]) -> dict[str, LearnedGenerator]:
    """{variant name: generator} for every generator `cfg` names. A generator already saved under
    `out/generators/` with the same settings and the same registry is loaded, not trained again."""
    gens = {}
    seen = [t for t in tasks if t.split == "train"]
    examples = {t.name: t.example_pairs(cfg.train_fraction, cfg.seed) for t in seen}
    base = TaskModel("classify", encoder)
    variants = [Variant.parse(g) for g in cfg.generators]
    derived: list[Task] = []
    for v in variants:
        directory = out / "generators" / v.name.replace(":", "-")
        key = generator_key(v, cfg, registry)
        if (directory / GENERATOR_KEY_NAME).is_file() and (directory / GENERATOR_KEY_NAME).read_text().strip() == key:
            gens[v.name] = LearnedGenerator.from_pretrained(directory, registry, device=cfg.device)
            say(f"{v.name}: cached in {directory}")
            continue
        if v.derived and not derived:
            derived = [replace(d, descriptions=[describe(d, d.description, cfg.labels_in_description)])
                       for d in derived_tasks(seen, cfg.train_fraction, cfg.seed)]
            say(f"derived tasks: {len(derived)}")
        task_config = TaskTrainingConfig(steps=cfg.task_steps, lr=cfg.task_lr, tasks_per_step=cfg.tasks_per_step,
                                         rows_per_task=cfg.task_rows, validation_tasks=cfg.validation_tasks,
                                         contrast_weight=cfg.contrast_weight if v.contrast else 0.0,
                                         contrast_margin=cfg.contrast_margin, seed=cfg.seed,
                                         train_fraction=cfg.train_fraction)
        kl = cfg.kl_weight_icm if v.method == "icm" else cfg.kl_weight_sg
        t0 = time.perf_counter()
        with_examples = v.method == "icm" and v.objective == "reconstruction" and any(cfg.examples_per_request)
        tv = TaskVectors(registry.spec, loaded=encoder) if with_examples else None
        gens[v.name] = train_generator_for(
            v.objective, registry, v.method, seen, base, task_config, residual=v.residual,
            derived=derived if v.derived else (), out_dir=directory,
            epochs=cfg.generator_epochs, latent=cfg.latent, kl_weight=kl, seed=cfg.seed, top_k=cfg.top_k,
            temperature=cfg.temperature, examples=examples if tv is not None else None, task_vectors=tv)
        atomic.write_bytes(directory / GENERATOR_KEY_NAME, (key + "\n").encode())
        say(f"{v.name}: trained in {time.perf_counter() - t0:.0f} s")
    return gens


GENERATOR_KEY_NAME = "bench_key.txt"


def generator_key(v: Variant, cfg: ClsBenchConfig, registry: Registry) -> str:
    """What a saved generator of the benchmark was trained from: its variant, the settings that reach
    its training, and the registry (experts and multi-task LoRA) it was trained on."""
    fields = {k: getattr(cfg, k) for k in ("train_fraction", "generator_epochs", "task_steps",
                                           "task_lr", "tasks_per_step", "task_rows", "validation_tasks", "top_k",
                                           "temperature", "latent", "kl_weight_icm", "kl_weight_sg", "seed",
                                           "labels_in_description")}
    if v.contrast:
        fields |= {"contrast_weight": cfg.contrast_weight, "contrast_margin": cfg.contrast_margin}
    if v.method == "icm":
        fields["examples"] = bool(any(cfg.examples_per_request)) and v.objective == "reconstruction"
    multitask = load_multitask(registry).metadata.get("config") if has_multitask(registry) else None
    state = {"variant": asdict(v), "settings": fields, "registry": registry.fingerprint(), "multitask": multitask}
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------ evaluation

def method_loras(tasks: list[Task], descs: list[str], mismatched: list[str] | None, registry: Registry,
                 oracle: Registry | None, gens: dict[str, LearnedGenerator],
                 cfg: ClsBenchConfig) -> dict[str, list[Lora | None]]:
    """Every method's LoRA for each task (None: the base model; missing oracle: left out).
    With `mismatched` descriptions, the learned methods and `weighted` also run the controls."""
    loras: dict[str, list[Lora | None]] = {"base": [None] * len(tasks)}
    known = {e.name: registry for e in registry.experts()}
    known |= {e.name: oracle for e in oracle.experts()} if oracle is not None else {}
    if all(t.name in known for t in tasks):
        loras["oracle"] = [known[t.name].lora(t.name) for t in tasks]  # type: ignore[union-attr]
    if has_multitask(registry):
        loras["multitask"] = list(MultitaskGenerator(registry).generate(descs))
    for method in RETRIEVAL:
        gen = RetrievalGenerator(registry, method, k=cfg.top_k, temperature=cfg.temperature)
        loras[method] = list(gen.generate(descs))
        if method == "weighted" and mismatched is not None:
            loras[f"mismatched({method})"] = list(gen.generate(mismatched))
    unrelated = [unrelated_description(t.name, cfg.seed) for t in tasks]
    for name, gen in gens.items():
        loras[name] = list(gen.generate(descs, seed=cfg.seed))
        if mismatched is not None:
            loras[f"mismatched({name})"] = list(gen.generate(mismatched, seed=cfg.seed))
            loras[f"random({name})"] = list(gen.generate(unrelated, seed=cfg.seed))
            for n in (n for n in cfg.examples_per_request if n and gen.task_vector_dim):
                shots = [t.example_pairs(cfg.train_fraction, cfg.seed, n) for t in tasks]
                loras[f"{name}+{n} examples"] = list(gen.generate(descs, examples=shots, seed=cfg.seed))
    return loras


def mismatched_descriptions(tasks: list[Task], cfg: ClsBenchConfig) -> list[str]:
    """Each task gets the description of another task of the same split from another family."""
    pick = [mismatched_index([t.name for t in tasks], [t.cluster for t in tasks], i, cfg.seed) for i in range(len(tasks))]
    return [describe(tasks[j], tasks[j].description, cfg.labels_in_description) for j in pick]


def evaluate(tasks: list[Task], split: str, registry: Registry, oracle: Registry | None,
             gens: dict[str, LearnedGenerator], encoder: EncoderModel, cfg: ClsBenchConfig,
             controls: bool) -> list[dict[str, Any]]:
    if not tasks:
        return []
    descs = [describe(t, t.description, cfg.labels_in_description) for t in tasks]
    mismatched = mismatched_descriptions(tasks, cfg) if controls and len(tasks) > 1 else None
    loras = method_loras(tasks, descs, mismatched, registry, oracle, gens, cfg)
    tests = [t.split_instances(cfg.train_fraction, cfg.seed)[1] for t in tasks]
    methods = list(loras)
    flat = [lo for m in methods for lo in loras[m]]
    scores = accuracy(encoder, flat, [t.labels or [] for t in tasks] * len(methods), tests * len(methods))
    rows = []
    for i, (method, score) in enumerate(zip((m for m in methods for _ in tasks), scores)):
        task = tasks[i % len(tasks)]
        rows.append({"item": task.name, "method": method, "score": score, "group": task.cluster or "none",
                     "split": split, "n_test": len(tests[i % len(tasks)])})
    return rows


def run_cls_bench(data: Path, out: Path, cfg: ClsBenchConfig, *, cache: Path | None = None,
                  base: Path | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    say = log or (lambda _: None)
    start = time.perf_counter()
    tasks = load_tasks(data)
    for g in cfg.generators:
        Variant.parse(g)  # a typo is an error now, not after the experts are trained
    file = data / "tasks.jsonl" if data.is_dir() else data
    text_model = str(base) if base is not None else None
    base = base or default_model_path()
    encoder = EncoderModel.load(base, device=cfg.device)
    key = cfg.expert_key(file.read_bytes(), str(base))
    cache = cache or out / "experts"
    cache = cache / key
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    registry, oracle = build_experts(tasks, cache, cfg, encoder, text_model, say)
    timings["experts_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    build_multitask(registry, tasks, cfg, encoder, say)
    timings["multitask_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    gens = build_generators(registry, tasks, out, cfg, encoder, say)
    timings["generators_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    held = [t for t in tasks if t.split != "train"]
    seen = [t for t in tasks if t.split == "train"]
    rows = evaluate(held, "heldout", registry, oracle, gens, encoder, cfg, controls=True)
    rows += evaluate(seen, "train", registry, oracle, gens, encoder, cfg, controls=cfg.train_controls)
    timings["evaluation_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - start
    summary = write_report(rows, out, title=f"cls benchmark: {file.name}", metric="accuracy")["summary"]
    transfer = {split: transfer_table(rows, split, seed=cfg.seed) for split in ("heldout", "train")}
    (out / "transfer.md").write_text("".join(f"## {split} tasks\n\n{markdown_table(table)}\n\n"
                                             for split, table in transfer.items() if table))
    bench = {"data": str(file), "tasks": {"train": len(seen), "heldout": len(held)}, "expert_cache": str(cache),
             "config": asdict(cfg), "timings": {k: round(v, 1) for k, v in timings.items()}, "summary": summary,
             "transfer": transfer}
    (out / "bench.json").write_text(json.dumps(bench, indent=2, default=str) + "\n")
    return bench
