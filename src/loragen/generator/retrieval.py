"""Non-generative methods: nearest expert, top-K softmax-weighted mean, top-K equal mean, uniform
mean of all.

All four are one weighted sum over the registry's expert Bs, for every layer and module of every
request at once. Because every expert shares the basis A, a weighted mean of Bs is the weighted
mean of the ΔWs.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass
from functools import cached_property

import torch
from einops import einsum

from ..adapters import Lora, LoraStack
from ..registry import Expert, Hit, Registry
from .errors import GenerationError
from .example_evidence import Evidence, applies, candidates, example_logprobs, examples_metadata, reweigh
from .inline_examples import with_inline_examples
from .task_vector import Example, TaskVectors, check_examples

METHODS = ("nearest", "weighted", "topk", "uniform")


@dataclass
class Neighbour:
    expert: str
    expert_id: int
    similarity: float
    weight: float
    example_logprob: float | None = None  # log p(the request's examples | this expert), when given


SETTLED_WEIGHT = 0.9


def ambiguous(neighbours: list[Neighbour]) -> bool:
    """Whether the request did not settle on one expert: its largest weight is below SETTLED_WEIGHT, so
    the LoRA mixes experts. A mixture of two tasks' LoRAs rarely does either, so such LoRAs fail far
    more often than the others (`loragen eval demo` counts both). Examples usually settle it."""
    return bool(neighbours) and max(n.weight for n in neighbours) < SETTLED_WEIGHT


def check_descriptions(descriptions: list[str], max_chars: int = 4000) -> list[str]:
    cleaned = []
    for i, d in enumerate(descriptions):
        if not isinstance(d, str) or not d.strip():
            raise GenerationError(f"description {i} is empty")
        if len(d) > max_chars:
            raise GenerationError(f"description {i} has {len(d)} characters; the limit is {max_chars}")
        cleaned.append(d.strip())
    return cleaned


class RetrievalGenerator:
    inline_examples: bool = True  # rows without examples read the pairs their description writes out

    def __init__(
        self,
        registry: Registry,
        method: str = "weighted",
        *,
        k: int = 4,
        temperature: float = 0.05,
        exclude: Collection[str] = (),
    ) -> None:
        """`exclude` names experts to act as if absent (held-out tasks in evaluation)."""
        if method not in METHODS:
            raise GenerationError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        self.exclude = set(exclude)
        if not [e for e in registry.experts() if e.name not in self.exclude]:
            raise GenerationError(f"the registry at {registry.path} has no experts")
        self.registry = registry
        self.method = method
        self.k = 1 if method == "nearest" else k
        self.temperature = temperature

    def _search(self, descriptions: list[str], k: int | None = None) -> list[list[Hit]]:
        k = k or self.k
        hits = self.registry.search(descriptions, k=k + len(self.exclude))
        return [[h for h in row if h.name not in self.exclude][:k] for row in hits]

    def uses_evidence(self, example_sets: list[list[Example]]) -> bool:
        return self.method == "weighted" and applies(self.registry.spec, example_sets)

    @cached_property
    def _experts(self) -> tuple[list[int], list[str], dict[str, torch.Tensor]]:
        return [e.id for e in self._candidates], [e.name for e in self._candidates], self._expert_stack.B

    @cached_property
    def _candidates(self) -> list[Expert]:
        return [e for e in self.registry.experts() if e.name not in self.exclude]

    @cached_property
    def _expert_stack(self) -> LoraStack:
        return self.registry.expert_stack(self._candidates)

    def weights(self, hits: list[list[Hit]],
                evidence: list[list[float] | None] | None = None) -> tuple[torch.Tensor, list[list[Neighbour]]]:
        ids, names, _ = self._experts
        column = {eid: i for i, eid in enumerate(ids)}
        w = torch.zeros(len(hits), len(ids), dtype=torch.float64)
        neighbours: list[list[Neighbour]] = []
        for row, row_hits in enumerate(hits):
            if self.method == "uniform":
                w[row] = 1.0 / len(ids)
            elif self.method == "topk":
                for h in row_hits:
                    w[row, column[h.expert_id]] = 1.0 / len(row_hits)
            else:
                alpha = reweigh([h.similarity for h in row_hits], self.temperature, evidence and evidence[row])
                for h, a in zip(row_hits, alpha):
                    w[row, column[h.expert_id]] = a
            row_evidence = evidence[row] if evidence and evidence[row] else [None] * len(row_hits)
            neighbours.append([Neighbour(h.name, h.expert_id, h.similarity, float(w[row, column[h.expert_id]]), e)
                               for h, e in zip(row_hits, row_evidence)])
        return w, neighbours

    @cached_property
    def task_vectors(self) -> TaskVectors:
        """Holds the base model, loaded on first use (only requests with examples need it)."""
        return TaskVectors(self.registry.spec)

    def example_evidence(self, example_sets: list[list[Example]], hits: list[list[Hit]]) -> Evidence | None:
        """`weighted` only: per row and hit, log p(the row's examples | that hit's expert)."""
        if not self.uses_evidence(example_sets):
            return None
        column = {eid: i for i, eid in enumerate(self._experts[0])}
        return example_logprobs(self.task_vectors.base, self._expert_stack, example_sets,
                                [[column[h.expert_id] for h in row] for row in hits])

    def mix(self, w: torch.Tensor, stacked: torch.Tensor, terms: int | None = None) -> torch.Tensor:
        """(requests, experts) weights × (experts, L, out, r) Bs -> (requests, L, out, r), each row
        from its `terms` (default K) largest weights. Each row adds its terms in a fixed order with
        elementwise ops, so a request's LoRA does not depend on the batch it came in (a GEMM over
        the batch rounds differently with its size; extra zero terms add exactly nothing);
        `uniform`, the same row for all, is computed once."""
        w = w.to(stacked.dtype)
        if self.method == "uniform":
            return einsum(w[:1], stacked, "n e, e l o r -> n l o r").expand(len(w), *stacked.shape[1:]).clone()
        values, columns = w.topk(min(terms or self.k, w.shape[1]), dim=1)
        out = stacked[columns[:, 0]] * values[:, 0, None, None, None]
        for j in range(1, values.shape[1]):
            out.add_(stacked[columns[:, j]] * values[:, j, None, None, None])
        return out

    def generate(
        self,
        descriptions: list[str],
        *,
        examples: list[list[dict[str, str]]] | None = None,
        seed: int | None = None,
        num_samples: int = 1,
    ) -> list[Lora]:
        """One LoRA per description (deterministic: `seed` and `num_samples` change nothing).
        For `weighted`, `examples` re-weigh the top-K experts as in the learned generators
        (`example_evidence.py`), and a row without them uses the pairs its description writes out
        unless `inline_examples` is False; the other methods ignore examples (`examples_used` says which)."""
        descriptions = check_descriptions(descriptions)
        example_sets = check_examples(examples, len(descriptions))
        inline = [False] * len(descriptions)
        if self.inline_examples and self.method == "weighted":
            example_sets, inline = with_inline_examples(descriptions, example_sets, self.task_vectors)
        if self.uses_evidence(example_sets):  # the examples choose among more candidates
            hits = candidates(lambda n: self._search(descriptions, n), self.k, example_sets)
        else:
            hits = self._search(descriptions)
        evidence = self.example_evidence(example_sets, hits)
        w, neighbours = self.weights(hits, evidence.logprobs if evidence else None)
        _, _, stacked = self._experts
        terms = max((len(row) for row in hits), default=1)
        mixed = {m: self.mix(w, b, terms) for m, b in stacked.items()}
        loras = []
        for i, desc in enumerate(descriptions):
            meta = {"method": self.method, "description": desc, "neighbours": [asdict(n) for n in neighbours[i]],
                    "ambiguous": ambiguous(neighbours[i]) if self.method in ("nearest", "weighted") else None,
                    **examples_metadata(evidence is not None and bool(example_sets[i]), inline[i], evidence, i)}
            loras.append(self.registry.basis.lora({m: b[i] for m, b in mixed.items()}, meta))
        return loras
