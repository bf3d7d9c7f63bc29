"""The service's state and work: registry, generators, base model, LoRA cache.

SQLite connections belong to the thread that opened them, so the registry is opened, and every
registry or generator call runs, on one `engine` thread. Completions run on their own `model`
thread; concurrent greedy ones are micro-batched into one forward in which every row applies its
own LoRA (shared weights are never modified). Requests with examples need the base model on the
engine thread too: every generator uses the same copy as the completions, whose lock keeps one
thread's per-row LoRA hooks out of the other's forward passes.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import itertools
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any, TypeVar

from ..adapters import Lora
from ..basemodel import BaseModel, BaseModelError, Completed
from ..embeddings import TextEncoder, resolve_dtype
from ..generator import LEARNED_METHODS, METHODS, GenerationError, TaskVectors, check_descriptions, load_generator
from ..generator.compiled_decode import bucket
from ..registry import Hit, Registry
from .batching import MicroBatcher
from .cache import ByteLRU, tensor_bytes
from .errors import ApiError
from .metrics import Metrics
from .readiness import Readiness
from .settings import ApiSettings

T = TypeVar("T")
log = logging.getLogger(__name__)


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

    @property
    def cacheable(self) -> bool:  # a learned method without a seed samples afresh every time
        return self.seed is not None or self.method not in LEARNED_METHODS

    def ids(self, seed: int | None, samples: int) -> list[str]:
        key = json.dumps([self.description, self.method, self.k, seed, self.num_samples, self.examples])
        digest = hashlib.sha256(key.encode()).hexdigest()[:24]
        return [f"lora-{digest}-{i}" for i in range(samples)]


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ApiError(400, "unknown_method", f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def _config_method(directory: Path) -> str | None:
    try:
        return json.loads((directory / "config.json").read_text()).get("method")
    except (OSError, ValueError, AttributeError):
        return None


_sampled = itertools.count()


@dataclass(eq=False)
class Completion:
    prompt: str
    lora: Lora | None
    max_tokens: int
    temperature: float
    seed: int | None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Greedy requests with the same max_tokens and stop strings share a forward; each row applies
        # its own LoRA. A sampled request runs alone, so that its seed gives the same text as alone.
        self.group: tuple[Any, ...] = (("greedy", self.max_tokens, self.stop) if self.temperature == 0
                                       else ("sampled", next(_sampled)))


@dataclass
class Stored:
    lora: Lora
    info: dict[str, Any]  # the LoraOut fields that do not change between cache hits
    created: int = field(default_factory=lambda: int(time.time()))


class Service:
    def __init__(self, settings: ApiSettings, encoder: TextEncoder | None = None) -> None:
        self.settings = settings
        self._encoder = encoder
        self.started = int(time.time())
        self.engine = ThreadPoolExecutor(1, thread_name_prefix="loragen-engine")
        self.model_pool = ThreadPoolExecutor(1, thread_name_prefix="loragen-model")
        self.cache: ByteLRU[str, Stored] = ByteLRU(settings.cache_bytes)
        self.metrics = Metrics(self.cache)
        self.batcher: MicroBatcher[Job, tuple[list[Stored], float]] = MicroBatcher(
            self._run_group, lambda j: j.group, max_batch=settings.max_batch,
            max_wait_s=settings.max_wait_ms / 1000)
        self.completer: MicroBatcher[Completion, Completed] = MicroBatcher(
            self._run_completions, lambda c: c.group, max_batch=settings.max_batch,
            max_wait_s=settings.max_wait_ms / 1000)
        self.registry: Registry | None = None
        self.generator_root: Path | None = settings.generator
        self._generators: dict[tuple[str, int], Any] = {}
        self._base: BaseModel | None = None
        self._base_loading = threading.Lock()
        self.readiness = Readiness()
        self._warming: asyncio.Task[None] | None = None
        self._stopping = False

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start serving at once; loading and warming go on in the background (see /readyz)."""
        self.batcher.start()
        self.completer.start()
        self._warming = asyncio.get_running_loop().create_task(self._warm())

    async def stop(self) -> None:
        self._stopping = True
        if self._warming is not None:
            self._warming.cancel()
        await self.batcher.stop()
        await self.completer.stop()
        if self.registry is not None:
            await self.in_engine(self.registry.close)
        self.engine.shutdown(wait=False)
        self.model_pool.shutdown(wait=False)

    @property
    def ready(self) -> bool:
        return self.readiness.ready and not self._stopping

    async def _warm(self) -> None:
        loop = asyncio.get_running_loop()
        steps = (("registry", self.engine, self._open), ("encoder", self.engine, self._warm_encoder),
                 ("generators", self.engine, self._warm_generators), ("base_model", self.model_pool, self._warm_base))
        for component, pool, fn in steps:
            self.readiness.loading(component)
            try:
                await loop.run_in_executor(pool, fn)
            except Exception as exc:  # the service stays up and /readyz says what failed
                log.error("%s failed to load: %s", component, exc)
                self.readiness.failed(component, exc)
                if component == "registry":
                    return  # nothing else can load without it
                continue
            self.readiness.done(component)
        # Torch, transformers and the models are hundreds of thousands of long-lived objects; a full
        # collection walks them all, stalling every request meanwhile. Freezing them keeps the
        # collector to what requests allocate.
        gc.collect()
        gc.freeze()

    def _open(self) -> None:
        path = self.settings.registry
        if path is None:
            from ..demo.world import build_demo

            world = build_demo(self.settings.home, encoder=self._encoder)
            path, self.generator_root = world.registry, self.generator_root or world.generators
        registry = Registry.open(path, encoder=self._encoder, device=self.settings.device)
        dtype = resolve_dtype(self.settings.encoder_dtype, registry.encoder.device)
        registry.encoder = registry.encoder.with_options(compute_dtype=dtype, workers=self.settings.encoder_workers)
        self.registry = registry

    def _warm_encoder(self) -> None:
        # Enough texts to be split, so the encoder's workers start now rather than on a request.
        encoder = self.reg.encoder
        encoder.encode(["warm up"] * 2 * encoder.workers)

    def _warm_generators(self) -> None:
        """The default generator, and every trained one the service can find, loaded and run once."""
        methods = [("weighted", self.settings.top_k)]
        root = self.generator_root
        if root is not None:
            methods += [(m, 0) for m in LEARNED_METHODS if (root / m / "config.json").is_file()
                        or ((root / "config.json").is_file() and _config_method(root) == m)]
        for method, k in methods:
            try:
                gen = self._generator(method, k)
                sizes = [1]
                if getattr(gen, "compile_decoder", False):  # compile every padded batch size now, not on a request
                    sizes = [1 << i for i in range(bucket(self.settings.max_batch).bit_length())]
                for n in sizes:
                    gen.generate(["warm up"] * n, seed=0)
            except GenerationError as exc:  # e.g. an empty registry: requests will say so
                log.warning("no warm-up generation with %s: %s", method, exc)

    def _warm_base(self) -> None:
        self.base_model().complete(["warm up"], max_new_tokens=1)

    async def in_engine(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.engine, partial(fn, *args, **kwargs))

    @property
    def reg(self) -> Registry:
        if self.registry is None:
            raise ApiError(503, "not_ready", "the service is still starting")
        return self.registry

    def changed(self) -> None:
        """After a registry write: generators hold stacked experts, cached LoRAs may be stale."""
        self._generators.clear()
        self.cache.clear()

    # ------------------------------------------------------------ generation
    def job(self, description: str, method: str, k: int | None, seed: int | None, num_samples: int = 1,
            examples: list[dict[str, str]] | None = None) -> Job:
        check_method(method)
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
        if method not in LEARNED_METHODS:
            return self.reg.search([description], k)
        gen = self._generator(method, 0)
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

    async def generate_many(self, jobs: list[Job]) -> list[tuple[list[Stored], float]]:
        """One generator call for all of `jobs` (which share one group), bypassing the batcher."""
        return await self._run_group(jobs)

    async def _run_group(self, jobs: list[Job]) -> list[tuple[list[Stored], float]]:
        results = await self.in_engine(self._generate, jobs)
        self.metrics.generation_batch(len(jobs))
        return results

    def _generator(self, method: str, k: int) -> Any:
        key = (method, k if method not in LEARNED_METHODS else 0)
        if key not in self._generators:
            gen_dir = None
            if method in LEARNED_METHODS and self.generator_root is not None:
                root = self.generator_root
                gen_dir = root if (root / "config.json").is_file() else root / method
            gen = load_generator(method, self.reg, k=k, temperature=self.settings.softmax_temperature,
                                 generator_dir=gen_dir, device=self.settings.device,
                                 inline_examples=self.settings.inline_examples,
                                 compile_decoder=self.settings.compile_decoder)
            gen.task_vectors = self._examples_model  # one base model for every generator's examples
            self._generators[key] = gen
        return self._generators[key]

    @cached_property
    def _examples_model(self) -> TaskVectors:
        spec = self.reg.spec
        shared = self._shared_base if spec.task_type == "CAUSAL_LM" else None
        return TaskVectors(spec, device=self.settings.device, load=shared)

    def _shared_base(self) -> BaseModel:
        try:
            return self.base_model()
        except ApiError as exc:
            raise GenerationError(f"examples need the base model: {exc.message}") from exc

    def _generate(self, jobs: list[Job]) -> list[tuple[list[Stored], float]]:
        first = jobs[0]
        gen = self._generator(first.method, first.k)
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
            raise ApiError(404, "not_found", f"no LoRA {lora_id!r}: unknown, or evicted from the cache "
                           "(generate it again; the same description, method, k and seed give the same id)")
        return stored

    # ------------------------------------------------------------ completions
    async def complete(self, prompt: str, lora: Lora | None, max_tokens: int, temperature: float,
                       seed: int | None, stop: tuple[str, ...] = ()) -> Completed:
        return await self.completer.submit(Completion(prompt, lora, max_tokens, temperature, seed, stop))

    async def _run_completions(self, jobs: list[Completion]) -> list[Completed]:
        texts = await asyncio.get_running_loop().run_in_executor(self.model_pool, self._complete, jobs)
        self.metrics.completion_batch(len(jobs))
        return texts

    def _complete(self, jobs: list[Completion]) -> list[Completed]:
        """One batched forward for `jobs` (one group: same max_tokens, greedy or one sampled job)."""
        first = jobs[0]
        loras = [j.lora for j in jobs] if any(j.lora is not None for j in jobs) else None
        return self.base_model().completions([j.prompt for j in jobs], loras=loras, max_new_tokens=first.max_tokens,
                                             temperature=first.temperature, seed=first.seed, stop=first.stop)

    def base_model(self) -> BaseModel:
        """Loaded once, by whichever thread asks first (the `model` thread, or the engine for examples)."""
        with self._base_loading:
            if self._base is None:
                path = self.reg.spec.base_model
                try:
                    self._base = BaseModel.load(path, device=self.settings.device)
                except BaseModelError as exc:
                    raise ApiError(503, "base_model_unavailable", f"the base model is unavailable: {exc}") from exc
            return self._base

    @staticmethod
    def new_completion_id() -> str:
        return f"cmpl-{secrets.token_hex(12)}"
