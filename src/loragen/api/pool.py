"""The generator pool: each generation method's generator, loaded once per (method, k) and kept.

Generators hold the registry's experts stacked, so the pool is emptied when the registry changes.
Every generator scores request examples with one base model, the completions' own copy: its lock
keeps one thread's per-row LoRA hooks out of the other's forward passes. All of it runs on the
engine thread (the registry's SQLite lives there).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

from ..basemodel import BaseModel
from ..errors import NotFoundError, UnavailableError
from ..generator import LEARNED_METHODS, GenerationError, TaskVectors, load_generator
from ..generator.compiled_decode import bucket
from ..generator.config import saved_method
from .lifecycle import Lifecycle
from .settings import ApiSettings

log = logging.getLogger(__name__)


def _config_method(directory: Path) -> str | None:
    try:
        return saved_method(json.loads((directory / "config.json").read_text()))
    except (OSError, ValueError, AttributeError):
        return None


class GeneratorPool:
    def __init__(self, settings: ApiSettings, life: Lifecycle, base_model: Callable[[], BaseModel]) -> None:
        self.settings = settings
        self._life = life
        self._base_model = base_model
        self._generators: dict[tuple[str, int], Any] = {}

    def get(self, method: str, k: int) -> Any:
        """The generator of `method` (with `k` neighbours for a retrieval method), loaded on first use."""
        key = (method, k if method not in LEARNED_METHODS else 0)
        if key not in self._generators:
            gen_dir = None
            root = self._life.generator_root
            if method in LEARNED_METHODS and root is not None:
                gen_dir = root if (root / "config.json").is_file() else root / method
            if method in LEARNED_METHODS and method not in self.trained_methods():
                raise NotFoundError(f"this server has no trained {method} generator; use another method")
            gen = load_generator(method, self._life.reg, k=k, temperature=self.settings.softmax_temperature,
                                 generator_dir=gen_dir, device=self.settings.device,
                                 inline_examples=self.settings.inline_examples,
                                 compile_decoder=self.settings.compile_decoder)
            gen.task_vectors = self._examples_model  # one base model for every generator's examples
            self._generators[key] = gen
        return self._generators[key]

    def loaded(self) -> dict[tuple[str, int], Any]:
        """The generators loaded now, by (method, k); k is 0 for a learned method."""
        return dict(self._generators)

    def clear(self) -> None:
        self._generators.clear()

    def trained_methods(self) -> list[str]:
        """The learned methods with a trained generator under the generator directory."""
        root = self._life.generator_root
        if root is None:
            return []
        return [m for m in LEARNED_METHODS if (root / m / "config.json").is_file()
                or ((root / "config.json").is_file() and _config_method(root) == m)]

    def warm(self) -> None:
        """The default generator, and every trained one the service can find, loaded and run once."""
        methods = [("weighted", self.settings.top_k)] + [(m, 0) for m in self.trained_methods()]
        for method, k in methods:
            try:
                gen = self.get(method, k)
                sizes = [1]
                if getattr(gen, "compile_decoder", False):  # compile every padded batch size now, not on a request
                    sizes = [1 << i for i in range(bucket(self.settings.max_batch).bit_length())]
                for n in sizes:
                    gen.generate(["warm up"] * n, seed=0)
            except GenerationError as exc:  # e.g. an empty registry: requests will say so
                log.warning("no warm-up generation with %s: %s", method, exc)

    @cached_property
    def _examples_model(self) -> TaskVectors:
        spec = self._life.reg.spec
        shared = self._shared_base if spec.task_type == "CAUSAL_LM" else None
        return TaskVectors(spec, device=self.settings.device, load=shared)

    def _shared_base(self) -> BaseModel:
        try:
            return self._base_model()
        except UnavailableError as exc:
            raise GenerationError(f"examples need the base model: {exc}") from exc
