"""`--eval`: score every item that has instances under each requested method and the baselines.

Baselines: `base` (no LoRA), `oracle` (the registry expert named like the item, when there is
one), `uniform`, `nearest`, `topk`, `weighted`, `icm` and `sg` (when their generator is given),
and `random(icm)` / `random(sg)`, the random-description control. Adapters the run wrote are
read back from the manifest; baselines it did not write are generated in memory, chunk by chunk.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..adapters import Lora, LoraSpec
from ..errors import LoragenError
from ..evaluation.controls import unrelated_description
from ..evaluation.evaluators import evaluator_for
from ..evaluation.report import write_report
from ..generator import LEARNED_METHODS, RETRIEVAL_METHODS, RetrievalGenerator
from ..registry import Registry
from .config import BatchConfig
from .items import BatchItem
from .manifest import Manifest
from .step import Generator, Job, generate_chunk

BASELINES = ("base", "oracle", "uniform", "nearest", "topk", "weighted", *LEARNED_METHODS)


def control_name(method: str) -> str:
    return f"random({method})"


def eval_methods(requested: list[str], generators: dict[str, Generator]) -> list[str]:
    """Baselines first, then requested methods; learned ones only where a generator is loaded."""
    methods = [m for m in BASELINES if m not in LEARNED_METHODS or m in generators]
    methods += [m for m in requested if m not in methods and m in generators]
    return methods + [control_name(m) for m in LEARNED_METHODS if m in generators]


def read_adapter(path: Path, spec: LoraSpec) -> Lora:
    """A written adapter, in the registry's spec. PEFT files do not keep the module order, and
    `LoraStack` needs one order to apply it next to in-memory LoRAs; tensors are keyed by name."""
    lora = Lora.from_pretrained(path)
    by_name = {m.name: m for m in spec.modules}
    same_shape = (lora.spec.rank, lora.spec.scaling) == (spec.rank, spec.scaling)
    if {m.name: m for m in lora.spec.modules} != by_name or not same_shape:
        raise LoragenError(f"{path} does not fit the registry's spec; was it written for another registry?")
    return Lora(spec, lora.A, lora.B, lora.metadata)


def _cells(items: list[BatchItem], methods: list[str], registry: Registry, generators: dict[str, Generator],
           manifest: Manifest, seed: int) -> list[tuple[BatchItem, str, Lora | None]]:
    experts = {e.name for e in registry.experts()}
    cells: list[tuple[BatchItem, str, Lora | None]] = []
    jobs: list[Job] = []
    for item in items:
        for m in methods:
            if m == "base":
                cells.append((item, m, None))
            elif m == "oracle":
                if item.id in experts:
                    cells.append((item, m, registry.lora(item.id)))
            elif manifest.is_done(item.id, m):
                path = manifest.path.parent / manifest.latest[(item.id, m)]["path"]
                cells.append((item, m, read_adapter(path, registry.spec)))
            elif m.startswith("random("):
                jobs.append(Job(replace(item, description=unrelated_description(item.id, seed)), m))
            else:
                jobs.append(Job(item, m))
    controls = {control_name(m): generators[m] for m in LEARNED_METHODS if m in generators}
    for o in generate_chunk({**generators, **controls}, jobs, seed=seed):
        if o.lora is not None:  # a generation error leaves that cell out of the report
            cells.append((o.job.item, o.job.method, o.lora))
    order = {m: i for i, m in enumerate(methods)}
    return sorted(cells, key=lambda c: order[c[1]])  # the report lists methods in this order


def evaluate_batch(items: list[BatchItem], config: BatchConfig, registry: Registry,
                   generators: dict[str, Generator], manifest: Manifest) -> dict[str, Any] | None:
    """Score, write report.json/md/png into the output directory, and return the report (None
    when no item has instances)."""
    scored = [i for i in items if i.instances]
    if not scored:
        return None
    gens = dict(generators)
    for m in RETRIEVAL_METHODS:
        gens.setdefault(m, RetrievalGenerator(registry, m, k=config.k, temperature=config.temperature))
    methods = eval_methods(config.methods, gens)
    evaluator = evaluator_for(registry.spec, device=config.device)
    rows: list[dict[str, Any]] = []
    chunks = range(0, len(scored), config.batch_size)
    for start in tqdm(chunks, desc="evaluate", unit="chunk", dynamic_ncols=True):
        cells = _cells(scored[start:start + config.batch_size], methods, registry, gens, manifest, config.seed)
        cap = config.max_eval_instances
        results = evaluator.score([lo for _, _, lo in cells], [list(it.instances or ())[:cap] for it, _, _ in cells],
                                  [list(it.labels) if it.labels else None for it, _, _ in cells])
        for (item, method, _), res in zip(cells, results):
            rows.append({"item": item.id, "method": method, "group": item.group, "split": item.split, **res})
    title = f"loragen batch: {Path(config.input).name} on {Path(config.registry).name}"
    return write_report(rows, config.out, title=title, metric=evaluator.metric)
