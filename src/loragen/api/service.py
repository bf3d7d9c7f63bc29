"""The service: LoRA generation and the LoRA cache, over the life-cycle, the generator pool and the
completion engine (each in its own module).

Concurrent generation requests are micro-batched: those that one generator call can share (method,
k, seed, samples) run together on the engine thread. Generated LoRAs are kept in a byte-bounded
cache under ids that a request with the same description, method, k and seed gives again.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from ..adapters import Lora
from ..basemodel import BaseModel
from ..embeddings import TextEncoder
from ..errors import NotFoundError, UnknownMethodError
from ..generator import LEARNED_METHODS, METHODS, check_descriptions
from ..registry import Hit, Registry
from .batching import MicroBatcher, Wanted, run_wanted
from .cache import ByteLRU, tensor_bytes
from .completions import CompletionEngine
from .lifecycle import Lifecycle, WarmStep
from .metrics import Metrics
from .pool import GeneratorPool
from .settings import ApiSettings


@dataclass(frozen=True)
class Job:
    description: str
    method: str
    k: int
    seed: int | None
    num_samples: int = 1
    examples: tuple[tuple[tuple[str, str], ...], ...] | None = None

    @property
    def group(self) -> tuple[Any, ...]:
        return (self.method, self.k, self.seed, self.num_samples, self.examples is not None)

    def cost(self) -> int:
        """The characters of the examples: what a generator call's time and memory grow with."""
        return sum(len(value) for example in self.examples or () for _, value in example)

    @property
    def cacheable(self) -> bool:  # a learned method without a seed samples afresh every time
        return self.seed is not None or self.method not in LEARNED_METHODS

    def ids(self, seed: int | None, samples: int) -> list[str]:
        key = json.dumps([self.description, self.method, self.k, seed, self.num_samples, self.examples])
        digest = hashlib.sha256(key.encode()).hexdigest()[:24]
        return [f"lora-{digest}-{i}" for i in range(samples)]


def check_method(method: str) -> None:
    if method not in METHODS:
        raise UnknownMethodError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


@dataclass
class Stored:
    lora: Lora
    info: dict[str, Any]  # the LoraOut fields that do not change between cache hits
    created: int = field(default_factory=lambda: int(time.time()))


Generated = tuple[list[Stored], float]  # one request's LoRAs and the generator call's seconds

class Service:
    def __init__(self, settings: ApiSettings, encoder: TextEncoder | None = None) -> None:
        self.settings = settings
        self.started = int(time.time())
        self.cache: ByteLRU[str, Stored] = ByteLRU(settings.cache_bytes)
        self.metrics = Metrics(self.cache)
        self.life = Lifecycle(settings, encoder)
        self.completions = CompletionEngine(settings, self.life, self.metrics)
        self.pool = GeneratorPool(settings, self.life, self.completions.base_model)
        self.batcher: MicroBatcher[Job, Generated] = MicroBatcher(
            self._run_group, lambda j: j.group, max_batch=settings.max_batch,
            max_wait_s=settings.max_wait_ms / 1000, cost=Job.cost, max_cost=settings.max_example_chars)
        self.engine = self.life.engine
        self.readiness = self.life.readiness
        self.in_engine = self.life.in_engine

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start serving at once; loading and warming go on in the background (see /readyz)."""
        steps = [WarmStep("generators", self.engine, self.pool.warm),
                 WarmStep("base_model", self.completions.model_pool, self.completions.warm)]
        await self.life.start([self.batcher, self.completions], steps, on_world_built=self.pool.warm)

    async def stop(self) -> None:
        await self.life.stop()

    @property
    def ready(self) -> bool:
        return self.life.ready

    @property
    def reg(self) -> Registry:
        return self.life.reg

    def changed(self) -> None:
        """After a registry write: generators hold stacked experts, cached LoRAs may be stale."""
        self.pool.clear()
        self.cache.clear()

    # ------------------------------------------------------------ generation
    def job(self, description: str, method: str, k: int | None, seed: int | None, num_samples: int = 1,
            examples: list[dict[str, str]] | None = None) -> Job:
        check_method(method)
        self.life.check_serves(method)
        desc = check_descriptions([description])[0]
        ex = tuple(tuple(sorted(e.items())) for e in examples) if examples is not None else None
        if method in LEARNED_METHODS:
            return Job(desc, method, 0, seed, num_samples, ex)
        # Retrieval is deterministic: seed and samples change nothing, so they must not split the cache.
        return Job(desc, method, 1 if method == "nearest" else k or self.settings.top_k, None, 1, ex)

    def search(self, description: str, k: int, method: str | None) -> list[list[Hit]]:
        """The registry's neighbours; for a learned method, ranked and scored as that generator does."""
        if method is not None:
            check_method(method)
            self.life.check_serves(method)
        if method not in LEARNED_METHODS:
            return self.reg.search([description], k)
        gen = self.pool.get(method, 0)
        return gen.search(gen.embed([description]), k=k)

    def cached(self, job: Job) -> list[Stored] | None:
        if not job.cacheable:
            return None
        found = [self.cache.get(i) for i in job.ids(job.seed, job.num_samples)]
        if any(f is None for f in found):
            return None
        return [f for f in found if f is not None]

    async def generate(self, job: Job) -> tuple[list[Stored], bool, float]:
        """The LoRAs of one request, whether they came from the cache, and the decode time (s)."""
        hit = self.cached(job)
        if hit is not None:
            return hit, True, 0.0
        stored, seconds = await self.batcher.submit(job)
        return stored, False, seconds

    async def generate_many(self, jobs: list[Job]) -> list[Generated]:
        """`jobs` (which share one group), bypassing the batcher, in generator calls of at most
        max_batch: one call holds the engine no longer than a micro-batch, and a request cancelled
        between calls (client gone, deadline past) runs no more of them."""
        out: list[Generated] = []
        for start in range(0, len(jobs), self.settings.max_batch):
            out += [r for r in await self._run_group(jobs[start:start + self.settings.max_batch]) if r is not None]
        return out

    async def _run_group(self, jobs: list[Job], wanted: Wanted | None = None) -> list[Generated | None]:
        results = await self.in_engine(self._generate, jobs, wanted)
        if ran := sum(r is not None for r in results):
            self.metrics.generation_batch(ran)
        return results

    def _generate(self, jobs: list[Job], wanted: Wanted | None = None) -> list[Generated | None]:
        """Runs on the engine thread. Rows that `wanted` says lost their client are skipped (None)."""
        return run_wanted(jobs, wanted, self._generate_live)

    def _generate_live(self, jobs: list[Job]) -> list[Generated]:
        first = jobs[0]
        gen = self.pool.get(first.method, first.k)
        examples = None
        if first.examples is not None:
            examples = [[dict(e) for e in (j.examples or ())] for j in jobs]
        started = time.perf_counter()
        loras = gen.generate([j.description for j in jobs], examples=examples, seed=first.seed,
                             num_samples=first.num_samples)
        seconds = time.perf_counter() - started
        per = len(loras) // len(jobs)  # retrieval methods give one LoRA whatever num_samples says
        out = []
        for i, job in enumerate(jobs):
            samples = loras[i * per:(i + 1) * per]
            seed = samples[0].metadata.get("seed", job.seed)
            ids = job.ids(seed, len(samples))
            stored = [Stored(lora, self._info(lora, lid, ids)) for lora, lid in zip(samples, ids)]
            for s in stored:
                # The basis A is shared by every LoRA of the registry, so only B counts.
                self.cache.put(s.info["id"], s, tensor_bytes(s.lora.B) + 1024)
            out.append((stored, seconds))
        return out

    @staticmethod
    def _info(lora: Lora, lora_id: str, ids: list[str]) -> dict[str, Any]:
        m, s = lora.metadata, lora.spec
        return {"id": lora_id, "method": m.get("method"), "description": m.get("description", ""),
                "base_model": s.base_model, "rank": s.rank, "alpha": s.alpha, "target_modules": s.target_modules,
                "neighbours": m.get("neighbours", []), "ood": m.get("ood"), "clipped": m.get("clipped"),
                "ambiguous": m.get("ambiguous"), "examples_used": m.get("examples_used"),
                "examples_from_description": m.get("examples_from_description"),
                "examples_fit": m.get("examples_fit"), "examples_ood": m.get("examples_ood"),
                "seed": m.get("seed"), "sample_ids": ids}

    def served_loras(self) -> list[tuple[str, Stored]]:
        """The LoRAs that can be named now (the cache's), most recently used first."""
        return self.cache.items()[::-1]

    def lookup(self, lora_id: str) -> Stored:
        stored = self.cache.get(lora_id)
        if stored is None:
            raise NotFoundError(f"no LoRA {lora_id!r}: unknown, or evicted from the cache "
                                "(generate it again; the same description, method, k and seed give the same id)")
        return stored

    # ------------------------------------------------------------ completions
    def base_model(self) -> BaseModel:
        return self.completions.base_model()
