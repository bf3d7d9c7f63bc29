"""Generators: a description in, a LoRA out. Every method sits behind `generate(descriptions, ...)`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..registry import Registry
from .config import CheckpointConfig, GeneratorConfig
from .errors import GenerationError
from .learned import LearnedGenerator
from .multitask import MultitaskGenerator
from .retrieval import METHODS as RETRIEVAL_METHODS
from .retrieval import Neighbour, RetrievalGenerator, check_descriptions
from .task_vector import TaskVectors
from .training import train_generator

LEARNED_METHODS = ("icm", "sg")
MULTITASK = "multitask"
METHODS = RETRIEVAL_METHODS + (MULTITASK,) + LEARNED_METHODS


def load_generator(method: str, registry: Registry, *, k: int = 4, temperature: float = 0.05,
                   generator_dir: str | Path | None = None, device: str = "cpu",
                   dtype: torch.dtype | None = None, inline_examples: bool = True,
                   compile_decoder: bool = False) -> Any:
    """The generator for `method`, by name; `icm` and `sg` load a trained checkpoint from `generator_dir`.
    `inline_examples`: rows without examples use the pairs their description writes out;
    `compile_decoder`: icm and sg decode under torch.compile (CUDA graphs on a GPU)."""
    gen = _load(method, registry, k, temperature, generator_dir, device, dtype)
    gen.inline_examples = inline_examples
    if isinstance(gen, LearnedGenerator):
        gen.compile_decoder = compile_decoder
    return gen


def _load(method: str, registry: Registry, k: int, temperature: float, generator_dir: str | Path | None,
          device: str, dtype: torch.dtype | None) -> Any:
    if method in RETRIEVAL_METHODS:
        return RetrievalGenerator(registry, method, k=k, temperature=temperature)
    if method == MULTITASK:
        return MultitaskGenerator(registry)
    if method in LEARNED_METHODS:
        if generator_dir is None:
            raise GenerationError(f"method {method!r} needs a trained generator: pass its directory "
                                  f"(train one with `loragen train generator --method {method}`)")
        gen = LearnedGenerator.from_pretrained(generator_dir, registry, device=device, dtype=dtype)
        if gen.method != method:
            raise GenerationError(f"{generator_dir} holds a {gen.method!r} generator, not {method!r}")
        return gen
    raise GenerationError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


__all__ = ["LEARNED_METHODS", "METHODS", "MULTITASK", "RETRIEVAL_METHODS", "CheckpointConfig", "GenerationError",
           "GeneratorConfig", "LearnedGenerator", "MultitaskGenerator", "Neighbour",
           "RetrievalGenerator", "TaskVectors", "check_descriptions", "load_generator", "train_generator"]
