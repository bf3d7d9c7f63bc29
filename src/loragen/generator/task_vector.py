"""ICM-LoRA's in-context task vector: what the base model makes of a few input/output examples.

For a causal LM it is the last layer's hidden state at the last position of `prompt(input) + output
+ eos`, averaged over the examples (the ICM-LoRA recipe). An encoder has no meaningful last position,
so there it is the mean-pooled embedding of `input => output`. Either way the average is
L2-normalised, so its scale does not depend on the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..adapters import LoraSpec
from .errors import GenerationError

Example = dict[str, str]
MAX_EXAMPLES = 64


def check_examples(examples: Sequence[Sequence[Any] | None] | None, n: int) -> list[list[Example]]:
    """One (possibly empty) list of {input, output} string pairs per description."""
    if examples is None:
        return [[] for _ in range(n)]
    if len(examples) != n:
        raise GenerationError(f"got {len(examples)} example lists for {n} descriptions; give one per description")
    out = []
    for i, group in enumerate(examples):
        group = list(group or [])
        if len(group) > MAX_EXAMPLES:
            raise GenerationError(f"description {i} has {len(group)} examples; the limit is {MAX_EXAMPLES}")
        for j, ex in enumerate(group):
            if not isinstance(ex, dict) or not isinstance(ex.get("input"), str) or not isinstance(ex.get("output"), str):
                raise GenerationError(f"example {j} of description {i} needs string 'input' and 'output'")
        out.append([{"input": ex["input"], "output": ex["output"]} for ex in group])
    return out


class TaskVectors:
    """`vectors(example_sets)` -> (N, dim) float32 on CPU, one unit row per non-empty set."""

    def __init__(self, spec: LoraSpec, base_model: str | Path | None = None, *, device: str = "cpu",
                 loaded: Any = None, load: Callable[[], Any] | None = None) -> None:
        """`loaded`: an already loaded `BaseModel` / `EncoderModel` to use instead of loading one;
        `load`: how to get it on first use (e.g. a service's own, shared with its completions)."""
        self.spec = spec
        self.path = str(base_model or spec.base_model)
        self.device = device
        self._load = load
        if loaded is not None:
            self.__dict__["base"] = loaded

    @cached_property
    def base(self) -> Any:
        """The base model (`BaseModel` or `EncoderModel`), loaded on first use."""
        if not Path(self.path).exists():
            raise GenerationError(f"examples need the base model, and there is none at {self.path}")
        if self._load is not None:
            return self._load()
        if self.spec.task_type == "CAUSAL_LM":
            from ..basemodel import BaseModel

            return BaseModel.load(self.path, device=self.device)
        from ..encoder import EncoderModel

        return EncoderModel.load(self.path, device=self.device)

    @property
    def dim(self) -> int:
        return int(self.base.model.config.hidden_size)

    @torch.no_grad()
    def vectors(self, example_sets: Sequence[Sequence[Example]]) -> torch.Tensor:
        if any(not s for s in example_sets):
            raise GenerationError("every example set needs at least one example")
        owner = torch.tensor([i for i, s in enumerate(example_sets) for _ in s])
        flat = [ex for s in example_sets for ex in s]
        rows = self._rows(flat).float().cpu()
        sums = torch.zeros(len(example_sets), rows.shape[1]).index_add_(0, owner, rows)
        return F.normalize(sums / torch.bincount(owner, minlength=len(example_sets))[:, None], dim=-1)

    def _rows(self, flat: list[Example]) -> torch.Tensor:
        model = self.base
        if self.spec.task_type != "CAUSAL_LM":
            return model.embed([f"{ex['input']} => {ex['output']}" for ex in flat])
        return model.last_hidden_states([ex["input"] for ex in flat], [ex["output"] for ex in flat])
