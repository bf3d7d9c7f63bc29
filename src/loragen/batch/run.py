"""`run_batch`: read the input, skip what the manifest says is done, generate the rest chunk by
chunk, append each chunk's records to the manifest, and optionally evaluate.

Ctrl-C between or during chunks leaves the manifest with every finished chunk and no adapter
directory half-written (adapters are renamed into place whole); a re-run picks up from there.
A re-run retries what failed and leaves the manifest with one record per (id, method).

Chunks run in this process by default; an `Engine` (e.g. `batch.ray_engine.RayEngine`) runs them
elsewhere and hands back each chunk's records in order, so the manifest, the resume logic and the
exit code are the same whichever engine ran them.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from ..errors import LoragenError
from ..registry import Registry
from .config import BatchConfig
from .items import BatchItem, ItemError, read_items
from .loading import load_generators, unavailable
from .manifest import NAME as MANIFEST_NAME
from .manifest import Manifest
from .step import ADAPTERS, Generator, Job, chunk_records


class Engine(Protocol):
    def run(self, config: BatchConfig, methods: list[str], missing: dict[str, str],
            chunks: list[list[Job]]) -> Iterator[list[dict[str, Any]]]:
        """Each chunk's manifest records (its adapters written under `config.out`), in chunk order.
        `methods` are the runnable ones; `missing` says why the others cannot run."""
        ...


@dataclass
class BatchSummary:
    items: int
    written: int
    skipped: int
    failed_items: list[str]
    seconds: float
    manifest: Path
    report: dict[str, Any] | None = None

    @property
    def exit_code(self) -> int:
        return min(len(self.failed_items), 255)

    def line(self) -> str:
        return (f"{self.items} items: {self.written} adapters written, {self.skipped} already done, "
                f"{len(self.failed_items)} items failed, in {self.seconds:.1f} s; manifest {self.manifest}")


def _remove_stale_temp_dirs(out: Path) -> None:
    """Temp adapter directories a killed run left behind (never a finished adapter)."""
    root = out / ADAPTERS
    if root.is_dir():
        for tmp in root.glob("**/.*.tmp"):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)


def _record_input_errors(manifest: Manifest, errors: list[ItemError]) -> None:
    fresh = []
    for e in errors:
        last = manifest.record(e.key, None)
        if last is None or last.get("error") != e.message:  # a re-run does not repeat the same error
            fresh.append({"id": e.key, "method": None, "line": e.line, "status": "error", "error": e.message})
    manifest.append(fresh)


@contextmanager
def _compacting(manifest: Manifest) -> Iterator[None]:
    """On the way out, even on Ctrl-C, drop the records that retries superseded."""
    try:
        yield
    finally:
        manifest.compact()


def _load(config: BatchConfig, registry: Registry, methods: list[str]) -> dict[str, Generator]:
    return load_generators(methods, registry, config.generators, k=config.k, temperature=config.temperature,
                           device=config.device)[0]


def run_batch(config: BatchConfig, *, after_chunk: Callable[[int], None] | None = None,
              engine: Engine | None = None) -> BatchSummary:
    """Generate every (item, method) adapter not done yet, in this process or on `engine`.
    `after_chunk(i)` runs once chunk i is in the manifest (progress hooks; tests use it to interrupt)."""
    started = time.perf_counter()
    if config.batch_size < 1:
        raise LoragenError("--batch-size must be at least 1")
    parsed = read_items(config.input, train_fraction=config.train_fraction, seed=config.seed)
    items = [p for p in parsed if isinstance(p, BatchItem)]
    errors = [p for p in parsed if isinstance(p, ItemError)]
    registry = Registry.open(config.registry, device=config.device)
    wanted = list(dict.fromkeys([*config.methods, *(m for i in items for m in i.methods or ())]))
    missing = unavailable(wanted, config.generators)
    for method in config.methods:  # a run-wide method that cannot run stops before anything is written
        if method in missing:
            raise LoragenError(missing[method])
    runnable = [m for m in wanted if m not in missing]
    generators = _load(config, registry, runnable) if engine is None else None

    config.out.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(config.out)
    manifest = Manifest(config.out / MANIFEST_NAME)
    _record_input_errors(manifest, errors)

    pairs = [(item, m) for item in items for m in (item.methods or config.methods)]
    todo = [(item, m) for item, m in pairs if not manifest.is_done(item.id, m)]
    skipped = len(pairs) - len(todo)
    by_item: dict[str, list[Job]] = {}
    for item, m in todo:
        by_item.setdefault(item.id, []).append(Job(item, m))
    per_item = list(by_item.values())
    chunks = [[j for jobs in per_item[start:start + config.batch_size] for j in jobs]
              for start in range(0, len(per_item), config.batch_size)]
    if generators is not None:
        results: Iterator[list[dict[str, Any]]] = (
            chunk_records(generators, missing, jobs, seed=config.seed, out_dir=config.out) for jobs in chunks)
    else:
        assert engine is not None
        results = engine.run(config, runnable, missing, chunks)
    written = 0
    with tqdm(total=len(todo), desc="generate", unit="lora", dynamic_ncols=True) as bar, _compacting(manifest), \
            closing(results):  # type: ignore[type-var]
        for n, records in enumerate(results):
            manifest.append(records)
            written += sum(r["status"] == "ok" for r in records)
            bar.update(len(records))
            bar.set_postfix(failed=sum(r["status"] != "ok" for r in records), refresh=False)
            if after_chunk is not None:
                after_chunk(n)

    failed = [e.key for e in errors]
    failed += [i.id for i in items
               if any((manifest.record(i.id, m) or {}).get("status") != "ok" for m in (i.methods or config.methods))]
    summary = BatchSummary(len(parsed), written, skipped, failed, 0.0, manifest.path)
    if config.evaluate:
        from .evaluate import evaluate_batch

        if generators is None:  # the engine ran generation elsewhere; scoring runs here
            generators = _load(config, registry, runnable)
        summary.report = evaluate_batch(items, config, registry, generators, manifest)
    summary.seconds = time.perf_counter() - started
    return summary
