"""The batch step: a chunk of (item, method) jobs in, one outcome per job out.

`generate_chunk` is a pure function of its arguments (the generators are read, never changed;
learned methods are seeded), so a chunk can run anywhere: in this process, or later as a Ray
Data `map_batches` callable whose constructor loads the generators once per worker. Each method's
jobs go through its generator in one call, so a learned method decodes the whole chunk in one
fused pass. If that call fails, the jobs are retried one by one, so only the bad item fails.

`write_outcome` turns an outcome into a PEFT adapter directory (written to a temp directory and
renamed, never half-written) and the manifest record that names it.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..adapters import Lora
from .items import BatchItem

ADAPTERS = "adapters"
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# what the generators say about a request's examples (`generator/example_evidence.py`)
EXAMPLE_KEYS = ("examples_used", "examples_from_description", "examples_fit", "examples_ood")


class Generator(Protocol):
    def generate(self, descriptions: list[str], *, examples: list[list[dict[str, str]]] | None = None,
                 seed: int | None = None, num_samples: int = 1) -> list[Lora]: ...


@dataclass(frozen=True)
class Job:
    item: BatchItem
    method: str


@dataclass
class Outcome:
    job: Job
    lora: Lora | None
    error: str | None = None
    generate_s: float = 0.0  # this job's share of its method's generate call


def _call(gen: Generator, items: Sequence[BatchItem], seed: int) -> list[Lora]:
    examples = [list(i.examples or ()) for i in items] if any(i.examples for i in items) else None
    loras = gen.generate([i.description for i in items], examples=examples, seed=seed)
    if len(loras) != len(items):
        raise RuntimeError(f"the generator returned {len(loras)} LoRAs for {len(items)} descriptions")
    return loras


def _error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def generate_chunk(generators: Mapping[str, Generator], jobs: Sequence[Job], *, seed: int = 0) -> list[Outcome]:
    """One `Outcome` per job, in order: the LoRA, or the error that item met."""
    outcomes: list[Outcome | None] = [None] * len(jobs)
    by_method: dict[str, list[int]] = {}
    for i, job in enumerate(jobs):
        by_method.setdefault(job.method, []).append(i)
    for method, idx in by_method.items():
        gen = generators.get(method)
        if gen is None:
            for i in idx:
                outcomes[i] = Outcome(jobs[i], None, f"method {method!r} is not available in this run")
            continue
        started = time.perf_counter()
        try:
            loras = _call(gen, [jobs[i].item for i in idx], seed)
        except Exception:  # noqa: BLE001 - isolate the failing item(s) below
            for i in idx:
                t = time.perf_counter()
                try:
                    outcomes[i] = Outcome(jobs[i], _call(gen, [jobs[i].item], seed)[0], None, time.perf_counter() - t)
                except Exception as exc:  # noqa: BLE001 - recorded per item
                    outcomes[i] = Outcome(jobs[i], None, _error(exc), time.perf_counter() - t)
            continue
        share = (time.perf_counter() - started) / len(idx)
        for i, lora in zip(idx, loras):
            outcomes[i] = Outcome(jobs[i], lora, None, share)
    return [o for o in outcomes if o is not None]


def item_dirname(item_id: str) -> str:
    """A file-system-safe folder name for an id: the id itself when safe, else a slug + hash."""
    if _SAFE.fullmatch(item_id) and item_id not in {".", ".."}:
        return item_id
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", item_id).strip("._-")[:48] or "item"
    return f"{slug}-{hashlib.sha256(item_id.encode()).hexdigest()[:10]}"


def adapter_path(item_id: str, method: str) -> Path:
    """Where (item, method)'s adapter goes, relative to the output directory."""
    return Path(ADAPTERS) / item_dirname(item_id) / item_dirname(method)


def write_outcome(outcome: Outcome, out_dir: str | Path) -> dict[str, Any]:
    """Write the adapter of a successful outcome; return its manifest record either way."""
    job = outcome.job
    record: dict[str, Any] = {"id": job.item.id, "method": job.method, "line": job.item.line}
    if outcome.lora is None:
        return {**record, "status": "error", "error": outcome.error or "unknown error"}
    rel = adapter_path(job.item.id, job.method)
    started = time.perf_counter()
    try:
        outcome.lora.save_pretrained(Path(out_dir) / rel)
    except OSError as exc:
        return {**record, "status": "error", "error": f"cannot write the adapter: {_error(exc)}"}
    meta = outcome.lora.metadata
    return {**record, "status": "ok", "path": rel.as_posix(), "neighbours": meta.get("neighbours", []),
            "ood": meta.get("ood"), "clipped": meta.get("clipped"), "ambiguous": meta.get("ambiguous"),
            **{k: meta[k] for k in EXAMPLE_KEYS if k in meta},
            "timings": {"generate_s": round(outcome.generate_s, 6),
                        "write_s": round(time.perf_counter() - started, 6)}}


def chunk_records(generators: Mapping[str, Generator], missing: Mapping[str, str], jobs: Sequence[Job], *,
                  seed: int, out_dir: str | Path) -> list[dict[str, Any]]:
    """One chunk, start to finish: its manifest records, adapters written; the same on every engine.
    Jobs whose method cannot run (`missing`: method -> why) are recorded as errors first."""
    records = [{"id": j.item.id, "method": j.method, "line": j.item.line, "status": "error",
                "error": missing[j.method]} for j in jobs if j.method in missing]
    runnable = [j for j in jobs if j.method not in missing]
    return records + [write_outcome(o, out_dir) for o in generate_chunk(generators, runnable, seed=seed)]
