"""Which generator serves each method: retrieval ones from the registry, icm/sg from checkpoints.

`--generator` takes a checkpoint directory (its config.json names the method) or a folder that
holds `icm/` and/or `sg/` checkpoints; it may be given several times.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import LoragenError
from ..generator import LEARNED_METHODS, METHODS, TaskVectors, load_generator
from ..generator.config import saved_method
from ..registry import Registry
from .step import Generator


def _method_of(checkpoint: Path) -> str:
    try:
        method = saved_method(json.loads((checkpoint / "config.json").read_text()))
    except (OSError, ValueError) as exc:
        raise LoragenError(f"{checkpoint}/config.json is not a readable generator config: {exc}") from exc
    if method not in LEARNED_METHODS:
        raise LoragenError(f"{checkpoint} is not an icm or sg generator checkpoint")
    return str(method)


def generator_dirs(paths: Iterable[str | Path]) -> dict[str, Path]:
    """{method: checkpoint directory} from `--generator` values."""
    found: dict[str, Path] = {}
    for p in map(Path, paths):
        if (p / "config.json").is_file():
            candidates = [p]
        else:
            candidates = [p / m for m in LEARNED_METHODS if (p / m / "config.json").is_file()]
            if not candidates:
                raise LoragenError(f"{p} is neither a generator checkpoint nor a folder holding icm/ or sg/ ones")
        for c in candidates:
            method = _method_of(c)
            if method in found and found[method].resolve() != c.resolve():
                raise LoragenError(f"two {method} generators given: {found[method]} and {c}")
            found[method] = c
    return found


def unavailable(methods: Sequence[str], dirs: dict[str, Path]) -> dict[str, str]:
    """For each of `methods` that cannot run, why: unknown, or learned with no checkpoint given."""
    missing: dict[str, str] = {}
    for method in dict.fromkeys(methods):
        if method not in METHODS:
            missing[method] = f"unknown method {method!r}; choose from {', '.join(METHODS)}"
        elif method in LEARNED_METHODS and method not in dirs:
            missing[method] = f"method {method!r} needs a trained generator (--generator DIR)"
    return missing


def load_generators(methods: Sequence[str], registry: Registry, dirs: dict[str, Path], *, k: int = 4,
                    temperature: float = 0.05, device: str = "cpu") -> tuple[dict[str, Generator], dict[str, str]]:
    """The generators of `methods`, and for each one that cannot be had, why."""
    generators: dict[str, Generator] = {}
    missing = unavailable(methods, dirs)
    examples_model = TaskVectors(registry.spec, device=device)  # one base model for every method's examples
    for method in dict.fromkeys(methods):
        if method not in missing:
            gen = load_generator(method, registry, k=k, temperature=temperature, generator_dir=dirs.get(method),
                                 device=device)
            gen.task_vectors = examples_model
            generators[method] = gen
    return generators, missing
