"""Evaluators: one score per (LoRA, instance set), batched over many LoRAs at once.

- `LabelScoring`: the cls-tasks classifier (DESIGN §6) on an encoder; the score is accuracy.
- `CausalGreedy`: a causal LM; the score is greedy exact match, plus the mean NLL of the output
  tokens as `nll`.
`evaluator_for` picks one by the registry's base model, as `loragen train experts` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from ..adapters import Lora, LoraSpec
from ..basemodel import BaseModel
from ..encoder import EncoderModel, accuracy
from ..training.metrics import exact_match, output_nll
from ..training.tasks import Instance


class Evaluator(Protocol):
    metric: str

    def score(self, loras: Sequence[Lora | None], instances: Sequence[Sequence[Instance]],
              labels: Sequence[Sequence[str] | None] | None = None) -> list[dict[str, float]]:
        """Per group i: {"score": ..., **extras} of `loras[i]` (None: the base) on `instances[i]`."""
        ...


def _on(loras: Sequence[Lora | None], device: torch.device) -> list[Lora | None]:
    return [None if lo is None else lo.to(device=device) for lo in loras]


def labels_of(instances: Sequence[Instance], labels: Sequence[str] | None) -> list[str]:
    """The given label set, else the distinct outputs of the instances, sorted."""
    return list(labels) if labels else sorted({inst.output for inst in instances})


class LabelScoring:
    metric = "accuracy"

    def __init__(self, encoder: EncoderModel, *, batch_size: int = 128) -> None:
        self.encoder, self.batch_size = encoder, batch_size

    def score(self, loras: Sequence[Lora | None], instances: Sequence[Sequence[Instance]],
              labels: Sequence[Sequence[str] | None] | None = None) -> list[dict[str, float]]:
        labels = labels or [None] * len(instances)
        label_sets = [labels_of(inst, lab) for inst, lab in zip(instances, labels)]
        acc = accuracy(self.encoder, _on(loras, self.encoder.device), label_sets, instances, batch_size=self.batch_size)
        return [{"score": a} for a in acc]


class CausalGreedy:
    metric = "exact_match"

    def __init__(self, base: BaseModel, *, batch_size: int = 256, max_new_tokens: int | None = None) -> None:
        """`max_new_tokens` None: the longest expected output + 2 tokens (see `metrics.exact_match`)."""
        self.base, self.batch_size, self.max_new_tokens = base, batch_size, max_new_tokens

    def score(self, loras: Sequence[Lora | None], instances: Sequence[Sequence[Instance]],
              labels: Sequence[Sequence[str] | None] | None = None) -> list[dict[str, float]]:
        loras = _on(loras, self.base.device)
        em = exact_match(self.base, loras, instances, batch_size=self.batch_size, max_new_tokens=self.max_new_tokens)
        nll = output_nll(self.base, loras, instances, batch_size=self.batch_size)
        return [{"score": e, "nll": n} for e, n in zip(em, nll)]


def evaluator_for(spec: LoraSpec, *, device: str = "cpu") -> Evaluator:
    """Label scoring for an encoder registry, greedy exact match + NLL for a causal LM one."""
    if spec.task_type == "CAUSAL_LM":
        return CausalGreedy(BaseModel.load(spec.base_model, device=device))
    return LabelScoring(EncoderModel.load(spec.base_model, device=device))
