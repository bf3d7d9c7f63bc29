"""`loragen eval demo`: exact match of every method on the demo world's tasks.

Five description sets (`loragen.demo.sets`; `demo/data/README.md` says how each was written):
- `registry`: each task's first description (one the registry holds);
- `unseen`: each task's held-back paraphrase (never in the registry or generator training);
- `dev`: more paraphrases per task, also never in the registry, but used to choose the
  description encoder's defaults: many more descriptions than `unseen`, so a steadier figure, for
  nearest, icm and sg (with and without examples). Their oracle is each task's expert (the same
  LoRA on the same test inputs as in `registry`, so scored once there);
- `blind`: paraphrases written by writers who saw only each task's input/output examples; never in
  the registry and never used for a choice, so with `unseen` the test of paraphrases, and enough of
  them to read 95 % against; scored like `dev`, and each independently written batch also on its
  own (`blind_batches`);
- `heldout`: tasks whose experts are excluded from retrieval and from the generators' training
  (the generators evaluated there are the `*-holdout` ones built by the demo).
`icm+examples` and `sg+examples` give the same description with 4 input/output pairs from the
task's training split, as a user would paste them: they re-weigh the top-K experts by how well each
explains them (`generator/example_evidence.py`) and add icm's task vector.
The random-description control replaces the description by unrelated text: a generator that
ignores its input (Text-to-LoRA's trap) scores as well with it as with the real description.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapters import Lora
from ..basemodel import BaseModel
from ..demo import sets
from ..demo.world import HELD_OUT, DemoWorld
from ..generator import RetrievalGenerator, load_generator
from ..registry import Registry
from ..training.metrics import exact_match
from ..training.tasks import Task, read_tasks

UNRELATED = sets.texts("unrelated")  # the random-description control's texts
METHOD_ORDER = ("base", "uniform", "nearest", "weighted", "icm", "icm+examples", "sg", "sg+examples", "random(icm)",
                "random(sg)", "oracle")
SPLITS = ("registry", "unseen", "blind", "dev", "heldout")
PARAPHRASE_SPLITS = ("blind", "dev")  # the paraphrase test sets, scored for DEV_METHODS only
DEV_METHODS = ("nearest", "icm", "icm+examples", "sg", "sg+examples")
ROW_METADATA = ("neighbours", "examples_ood", "ambiguous")  # each row's, from its LoRA's metadata
EXAMPLES_PER_REQUEST = 4  # icm+examples: pairs from the task's training split, as a user would paste


@dataclass
class Cell:
    method: str
    split: str
    task: str
    description: str
    lora: Lora | None


def _generate(world: DemoWorld, registry: Registry, split: str, tasks: list[Task], descs: list[str],
              seed: int, methods: tuple[str, ...] = METHOD_ORDER) -> list[Cell]:
    exclude = HELD_OUT if split == "heldout" else ()
    suffix = "-holdout" if split == "heldout" else ""
    experts = {e.name: e for e in registry.experts()}
    cells = [Cell("base", split, t.name, d, None) for t, d in zip(tasks, descs) if "base" in methods]
    cells += [Cell("oracle", split, t.name, d, registry.lora(experts[t.name]))
              for t, d in zip(tasks, descs) if "oracle" in methods]
    for method in ("uniform", "nearest", "weighted"):
        if method in methods:
            gen = RetrievalGenerator(registry, method, exclude=exclude)
            cells += [Cell(method, split, t.name, d, lo) for t, d, lo in zip(tasks, descs, gen.generate(descs))]
    rng = random.Random(seed)
    unrelated = [rng.choice(UNRELATED) for _ in descs]
    for method in ("icm", "sg"):
        if method not in methods:
            continue
        gen = load_generator(method, registry, generator_dir=world.generators / f"{method}{suffix}")
        loras = gen.generate(descs, seed=seed)
        cells += [Cell(method, split, t.name, d, lo) for t, d, lo in zip(tasks, descs, loras)]
        if f"{method}+examples" in methods:
            examples = [t.example_pairs(0.9, seed, EXAMPLES_PER_REQUEST) for t in tasks]
            loras = gen.generate(descs, examples=examples, seed=seed)
            cells += [Cell(f"{method}+examples", split, t.name, d, lo) for t, d, lo in zip(tasks, descs, loras)]
        if f"random({method})" not in methods:
            continue
        controls = gen.generate(unrelated, seed=seed)
        cells += [Cell(f"random({method})", split, t.name, u, lo) for t, u, lo in zip(tasks, unrelated, controls)]
    return cells


def evaluate_demo(world: DemoWorld, *, test_per_task: int = 100, seed: int = 0) -> dict[str, Any]:
    registry = Registry.open(world.registry)
    base = BaseModel.load(world.base_model)
    tasks = read_tasks(world.tasks)
    seen = [t for t in tasks if t.name not in HELD_OUT]
    held = [t for t in tasks if t.name in HELD_OUT]
    cells = _generate(world, registry, "registry", seen, [t.descriptions[0] for t in seen], seed)
    cells += _generate(world, registry, "unseen", seen, [t.descriptions[-1] for t in seen], seed)
    for split in PARAPHRASE_SPLITS:
        paraphrases = sets.by_task(split)
        pairs = [(t, d) for t in seen for d in paraphrases.get(t.name, ())]
        cells += _generate(world, registry, split, [t for t, _ in pairs], [d for _, d in pairs], seed, DEV_METHODS)
    cells += _generate(world, registry, "heldout", held, [t.descriptions[0] for t in held], seed)
    by_name = {t.name: t for t in tasks}
    tests = {t.name: t.split_instances(0.9, seed)[1][:test_per_task] for t in tasks}
    scores = exact_match(base, [c.lora for c in cells], [tests[c.task] for c in cells])
    rows = [{"method": c.method, "split": c.split, "task": c.task, "description": c.description, "exact_match": s,
             **{k: (c.lora.metadata.get(k) if c.lora else None) for k in ROW_METADATA}}
            for c, s in zip(cells, scores)]
    oracle = {r["task"]: r["exact_match"] for r in rows if r["method"] == "oracle" and r["split"] == "registry"}
    rows += [{**r, "method": "oracle", "exact_match": oracle[r["task"]], **dict.fromkeys(ROW_METADATA)}
             for r in rows if r["split"] in PARAPHRASE_SPLITS and r["method"] == DEV_METHODS[0]]
    table: dict[str, dict[str, float]] = {}
    for m in METHOD_ORDER:
        for split in SPLITS:
            vals = [r["exact_match"] for r in rows if r["method"] == m and r["split"] == split]
            if vals:
                table.setdefault(m, {})[split] = sum(vals) / len(vals)
    intervals = {m: {split: oracle_share_interval(rows, m, split) for split in cols} for m, cols in table.items()
                 if m != "oracle"}
    batch_of = sets.batch_of("blind")
    for r in rows:
        if r["split"] == "blind":
            r["batch"] = batch_of[r["description"]]
    return {"held_out_tasks": list(HELD_OUT), "test_per_task": test_per_task, "table": table,
            "oracle_share_90": intervals, "examples_ood": examples_ood_counts(rows),
            "ambiguous": ambiguous_counts(rows, oracle), "blind_batches": blind_batch_shares(rows), "rows": rows,
            "tasks": sorted(by_name)}


def oracle_share_interval(rows: list[dict[str, Any]], method: str, split: str, *, level: float = 0.9,
                          draws: int = 4000, seed: int = 0) -> list[float] | None:
    """A bootstrap interval for `method`'s share of the oracle on `split`: its descriptions resampled
    with replacement, each paired with its task's oracle score. With 15 descriptions one misread moves
    the share by 6-7 points, so a target of 95 % is read against this interval, not the point alone."""
    import numpy as np

    oracle = {r["task"]: r["exact_match"] for r in rows if r["method"] == "oracle" and r["split"] == split}
    pairs = [(r["exact_match"], oracle[r["task"]]) for r in rows
             if r["method"] == method and r["split"] == split and r["task"] in oracle]
    if not pairs or sum(o for _, o in pairs) == 0:
        return None
    ours, theirs = np.array(pairs, dtype=float).T
    picks = np.random.default_rng(seed).integers(0, len(pairs), size=(draws, len(pairs)))
    shares = ours[picks].sum(1) / np.maximum(theirs[picks].sum(1), 1e-12)
    low, high = np.quantile(shares, [(1 - level) / 2, (1 + level) / 2])
    return [float(low), float(high)]


def blind_batch_shares(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per method and blind batch: [share of the oracle, 90 % interval low, high]. A batch written after
    a choice is the clean test of that choice, so each is reported on its own."""
    out: dict[str, dict[str, list[float]]] = {}
    for batch in sorted({r["batch"] for r in rows if "batch" in r}):
        part = [r for r in rows if r.get("batch") == batch]
        oracle = sum(r["exact_match"] for r in part if r["method"] == "oracle")
        for m in DEV_METHODS:
            ours = sum(r["exact_match"] for r in part if r["method"] == m)
            ci = oracle_share_interval(part, m, "blind")
            if oracle > 0 and ci is not None:
                out.setdefault(m, {})[str(batch)] = [ours / oracle, *ci]
    return out


def examples_ood_counts(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[int]]]:
    """Per method and split: [rows flagged examples_ood, rows whose examples were scored]."""
    counts: dict[str, dict[str, list[int]]] = {}
    for r in rows:
        if r.get("examples_ood") is not None:
            c = counts.setdefault(r["method"], {}).setdefault(r["split"], [0, 0])
            c[0] += bool(r["examples_ood"])
            c[1] += 1
    return counts


def ambiguous_counts(rows: list[dict[str, Any]], oracle: dict[str, float]) -> dict[str, dict[str, list[int]]]:
    """Per method and split: [ambiguous rows, of them failing, other rows, of them failing], where
    failing is an exact match below half the task's oracle. Only methods that flag ambiguity."""
    counts: dict[str, dict[str, list[int]]] = {}
    for r in rows:
        if r.get("ambiguous") is None or r["task"] not in oracle:
            continue
        c = counts.setdefault(r["method"], {}).setdefault(r["split"], [0, 0, 0, 0])
        at = 0 if r["ambiguous"] else 2
        c[at] += 1
        c[at + 1] += r["exact_match"] < 0.5 * oracle[r["task"]]
    return counts


def markdown_table(report: dict[str, Any]) -> str:
    table = report["table"]
    oracle = table.get("oracle", {})
    intervals = report.get("oracle_share_90", {})
    header = ("method", "registry descriptions", "unseen paraphrases", "blind paraphrases", "dev paraphrases",
              "held-out tasks")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m, cols in table.items():
        cells = []
        for split in SPLITS:
            v, o = cols.get(split), oracle.get(split)
            if v is None:
                cells.append("")
                continue
            ci = intervals.get(m, {}).get(split)
            share = f"{v / o:.0%} of oracle" if o else ""
            if share and ci:
                share += f"; 90% CI {ci[0]:.0%}–{ci[1]:.0%}"
            cells.append(f"{v:.3f} ({share})" if share else f"{v:.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if report.get("examples_ood"):
        lines.append("\nNo expert explains the examples (`examples_ood`), rows flagged / rows with examples:")
    for m, splits in report.get("examples_ood", {}).items():
        lines.append(f"- {m}: " + ", ".join(f"{split} {n}/{total}" for split, (n, total) in splits.items()))
    if report.get("blind_batches"):
        lines.append("\nBlind paraphrases by batch, share of the oracle (90% CI):")
    for m, batches in report.get("blind_batches", {}).items():
        lines.append(f"- {m}: " + ", ".join(f"batch {b} {v:.0%} ({lo:.0%}–{hi:.0%})" for b, (v, lo, hi) in batches.items()))
    if report.get("ambiguous"):
        lines.append("\nAmbiguous LoRAs (no expert holds 90 % of the weight), failing (below half the oracle):")
    for m, splits in report.get("ambiguous", {}).items():
        lines.append(f"- {m}: " + "; ".join(f"{split} {a} ambiguous ({af} failing), {o} not ({of} failing)"
                                            for split, (a, af, o, of) in splits.items()))
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: Path) -> None:
    import json

    Path(path).write_text(json.dumps(report, indent=2))
