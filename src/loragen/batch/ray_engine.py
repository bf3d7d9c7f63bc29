"""`RayEngine`: the batch step on a Ray cluster, through Ray Data `map_batches` over an actor pool.

Each chunk `run_batch` forms is one row of a Ray dataset. An actor (`ChunkWorker`) opens the
registry and loads the generators once, then runs `step.chunk_records` on every chunk it is
given: the same function, seed and chunking as the local engine, so the adapters are byte for byte
the same and the manifest records differ only in their timings. Workers write adapters straight
into OUT, so OUT and the registry must be on storage every node of the cluster sees. The driver
gets each chunk's records back in order and appends them to the manifest as they arrive, so an
interrupt leaves every finished chunk recorded, exactly as the local engine does.

`ray` is imported only here, when this engine runs; `pip install loragen[ray]` provides it.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import LoragenError
from ..registry import Registry
from .config import BatchConfig
from .loading import load_generators
from .step import Generator, Job, chunk_records

log = logging.getLogger(__name__)


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise LoragenError("the ray engine needs Ray: pip install 'loragen[ray]'") from exc
    return ray


class ChunkWorker:
    """One actor of the pool: the registry and generators, loaded once, then chunk after chunk.
    Ray may call the actor from another thread than the one that built it, and a registry's SQLite
    connection belongs to one thread, so loading and every chunk run on one engine thread."""

    def __init__(self, config: BatchConfig, methods: list[str], missing: dict[str, str]) -> None:
        self.config, self.missing = config, missing
        self.engine = ThreadPoolExecutor(1, thread_name_prefix="loragen-chunk")
        self.generators = self.engine.submit(self._load, methods).result()

    def _load(self, methods: list[str]) -> dict[str, Generator]:
        registry = Registry.open(self.config.registry, device=self.config.device)
        return load_generators(methods, registry, self.config.generators, k=self.config.k,
                               temperature=self.config.temperature, device=self.config.device)[0]

    def _run(self, blob: bytes) -> str:
        jobs: list[Job] = pickle.loads(blob)
        records = chunk_records(self.generators, self.missing, jobs, seed=self.config.seed, out_dir=self.config.out)
        return json.dumps(records, default=str)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = [self.engine.submit(self._run, blob).result() for blob in batch["chunk"]]
        return {"records": np.array(out, dtype=object)}


@dataclass
class RayEngine:
    """`address`: a running cluster ("auto", "ray://host:10001", host:port), or None for a local
    Ray started for this run (and stopped after it). `workers`: actors in the pool, each holding
    its own generators; `gpus_per_worker`: GPUs each asks for (with `device="cuda"`)."""

    address: str | None = None
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def run(self, config: BatchConfig, methods: list[str], missing: dict[str, str],
            chunks: list[list[Job]]) -> Iterator[list[dict[str, Any]]]:
        if not chunks:
            return
        ray = import_ray()
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING)
        try:
            ctx = ray.data.DataContext.get_current()
            ctx.execution_options.preserve_order = True  # records reach the manifest in chunk order
            ctx.enable_progress_bars = False  # the run's own bar counts adapters
            rows = [{"chunk": pickle.dumps(jobs)} for jobs in chunks]
            ds = ray.data.from_items(rows, override_num_blocks=len(rows))
            ds = ds.map_batches(ChunkWorker, batch_size=1, batch_format="numpy",
                                fn_constructor_kwargs={"config": config, "methods": methods, "missing": missing},
                                compute=ray.data.ActorPoolStrategy(size=self.workers),
                                num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker or None)
            rows_out = ds.iter_rows()
            try:
                for row in rows_out:
                    yield json.loads(row["records"])
            finally:
                close = getattr(rows_out, "close", None)
                if close is not None:
                    close()
        finally:
            if started_here:
                ray.shutdown()
