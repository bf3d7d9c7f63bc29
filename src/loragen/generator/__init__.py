"""Generators: a description in, a LoRA out. Every method sits behind `generate(descriptions, ...)`."""

from __future__ import annotations

from ..registry import Registry
from .retrieval import METHODS as RETRIEVAL_METHODS
from .retrieval import GenerationError, Neighbour, RetrievalGenerator, check_descriptions

METHODS = RETRIEVAL_METHODS


def load_generator(method: str, registry: Registry, *, k: int = 4, temperature: float = 0.05) -> RetrievalGenerator:
    """The generator for `method`, by name."""
    if method in RETRIEVAL_METHODS:
        return RetrievalGenerator(registry, method, k=k, temperature=temperature)
    raise GenerationError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


__all__ = ["METHODS", "GenerationError", "Neighbour", "RetrievalGenerator", "check_descriptions", "load_generator"]
