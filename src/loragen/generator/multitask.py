"""`multitask`: the registry's multi-task LoRA, the same adapter for every description.

The baseline a generator must beat on tasks outside the registry: one LoRA trained on every
registry task at once, which reads no description (`training/multitask.py` trains it).
"""

from __future__ import annotations

from functools import cached_property

from ..adapters import Lora
from ..registry import Registry
from ..registry.multitask import MultitaskMissing, load_multitask
from .errors import GenerationError
from .example_evidence import examples_metadata
from .retrieval import check_descriptions
from .task_vector import check_examples


class MultitaskGenerator:
    method = "multitask"
    inline_examples: bool = False  # reads neither descriptions nor examples

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._lora  # noqa: B018 - a registry without one is an error now, not at the first request

    @cached_property
    def _lora(self) -> Lora:
        try:
            return load_multitask(self.registry)
        except MultitaskMissing as exc:
            raise GenerationError(str(exc)) from exc

    def generate(self, descriptions: list[str], *, examples: list[list[dict[str, str]]] | None = None,
                 seed: int | None = None, num_samples: int = 1) -> list[Lora]:
        """The multi-task LoRA once per description, with the description in its metadata."""
        descriptions = check_descriptions(descriptions)
        check_examples(examples, len(descriptions))
        return [self.registry.basis.lora({m: b.clone() for m, b in self._lora.B.items()},
                                         {"method": self.method, "description": d, "neighbours": [],
                                          "ambiguous": None, **examples_metadata(False, False, None, i)})
                for i, d in enumerate(descriptions)]
