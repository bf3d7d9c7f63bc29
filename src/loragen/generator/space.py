"""The learned generator's description space: how it reads a description, and exact search in it.

A description is encoded by the tuned encoder (`description_encoder.py`) if the generator has one,
else by the registry's, and mapped through the learned head (`description_head.py`) if any. Search
scores each of the generator's experts by its best registry description in that space, over every
description of those experts, so held-out experts are never candidates.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch

from ..registry import Hit, Registry
from ..registry.index import normalised
from .description_encoder import DescriptionEncoder
from .description_head import DescriptionHead
from .tokens import RegistryTokens

# The registry's descriptions in the space, each one's expert column, and the texts.
Described = tuple[torch.Tensor, torch.Tensor, list[str]]
# Registry descriptions already encoded: texts, unit rows (by the tuned encoder, if any), owners (expert ids).
Encoded = tuple[list[str], np.ndarray, np.ndarray]
# Texts and their unit rows by the tuned encoder, before the head.
KnownVectors = tuple[list[str], np.ndarray]


class DescriptionSpace:
    """Encoder, head and search of one generator. `encoded` passes the registry's descriptions
    already encoded (as training has them), so that they are not encoded again; `known` passes
    texts the tuned encoder has read before with their unit rows (as a checkpoint saves them), so
    that only the registry's newer descriptions are encoded."""

    def __init__(self, registry: Registry, tokens: RegistryTokens, *, top_k: int, temperature: float,
                 head: DescriptionHead | None = None, encoder: DescriptionEncoder | None = None,
                 encoded: Encoded | None = None, known: KnownVectors | None = None) -> None:
        self.registry, self.tokens, self.head, self.encoder = registry, tokens, head, encoder
        self.top_k, self.temperature = top_k, temperature
        self._encoded = encoded
        self._known = known

    def embed(self, descriptions: list[str]) -> np.ndarray:
        """Descriptions as the generator reads them: unit rows in its description space (the tuned
        encoder's, if any, else the registry's; then through the learned head, if any)."""
        encoder = self.encoder if self.encoder is not None else self.registry.encoder
        return self.describe(normalised(encoder.encode(descriptions)))

    def describe(self, vecs: np.ndarray) -> np.ndarray:
        """Encoder embeddings through the learned head, if any."""
        return self.head.project(vecs) if self.head is not None else vecs

    @cached_property
    def column(self) -> dict[int, int]:
        """Expert id -> its column in the generator's expert order."""
        return {eid: i for i, eid in enumerate(self.tokens.ids)}

    @cached_property
    def encoded(self) -> Encoded:
        """The registry's descriptions of the generator's experts: texts, unit rows by the tuned
        encoder (the registry's own when there is none), owners."""
        if self._encoded is not None:
            return self._encoded
        texts, vecs, owners = self.tokens.descriptions()
        if self.encoder is None or not texts:
            return texts, vecs, owners
        if self._known is None:  # one call over all texts, as training encodes them: the same rows, bit for bit
            return texts, normalised(self.encoder.encode(texts)), owners
        known = dict(zip(*self._known))
        new = list(dict.fromkeys(t for t in texts if t not in known))
        if new:
            known.update(zip(new, normalised(self.encoder.encode(new))))
        return texts, np.stack([known[t] for t in texts]), owners

    def known_vectors(self) -> KnownVectors | None:
        """What a checkpoint keeps so that loading it need not encode the registry again: the
        tuned encoder's unit rows of the registry's descriptions (None without a tuned encoder)."""
        if self.encoder is None:
            return None
        texts, vecs, _ = self.encoded
        return texts, vecs

    @cached_property
    def described(self) -> Described:
        """The registry's descriptions of the generator's experts in its space, each one's expert
        column, and their texts."""
        texts, vecs, owners = self.encoded
        return torch.from_numpy(self.describe(vecs)), torch.tensor([self.column[o] for o in owners.tolist()]), texts

    def best_per_expert(self, sims: torch.Tensor) -> torch.Tensor:
        """(N, descriptions) similarities -> (N, E): each expert scored by its best description."""
        col = self.described[1]
        best = torch.full((len(sims), len(self.column)), -torch.inf)
        return best.scatter_reduce(1, col.expand(len(sims), -1), sims, "amax")

    def search(self, query: np.ndarray, own: list[int | None] | None = None, k: int | None = None) -> list[list[Hit]]:
        """Top-K experts (K: `top_k`, unless `k`) for each `query` row (from `embed`), each scored by
        its best registry description in this space; `own[i]` (leave-one-out) skipped."""
        k = min(k or self.top_k, len(self.column))
        desc, desc_owner, texts = self.described
        sims = torch.from_numpy(np.ascontiguousarray(query)) @ desc.T
        best = self.best_per_expert(sims)
        for row, o in enumerate(own or []):
            if o is not None and o in self.column:
                best[row, self.column[o]] = -torch.inf
        top = best.topk(k, dim=1)
        experts = self.tokens.experts
        hits = []
        for row, (values, columns) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            row_hits = []
            for sim, col in zip(values, columns):
                if sim == -torch.inf:
                    continue
                text = texts[int(sims[row].masked_fill(desc_owner != col, -torch.inf).argmax())]
                row_hits.append(Hit(experts[col].id, experts[col].name, text, sim))
            hits.append(row_hits)
        return hits

    @cached_property
    def memory_keys(self) -> torch.Tensor:
        """(E, dim): each expert's unit mean description in this space."""
        desc, col, _ = self.described
        keys = torch.zeros(len(self.column), desc.shape[1]).index_add_(0, col, desc)
        return torch.nn.functional.normalize(keys, dim=-1)

    def memory_weights(self, query: torch.Tensor) -> torch.Tensor:
        """(N, E) softmax weights over each row's top-K experts, scored by their best description,
        with row i's own registry description left out: training's view of a paraphrase that the
        registry does not hold (rows are the registry's descriptions in `described` order).
        A row whose left-out read would rank another expert first reads with its own description in:
        a condition at expert B's key with expert A's LoRA as target would teach the decoder to
        average A and B. This also keeps an expert's only description in, so that its key is a
        training condition too."""
        desc, col, _ = self.described
        sims = query @ desc.T
        left_out = sims.clone()
        left_out.diagonal().fill_(-torch.inf)
        best = self.best_per_expert(left_out)
        misread = best.argmax(dim=1) != col
        best[misread] = self.best_per_expert(sims[misread])
        top = best.topk(min(self.top_k, best.shape[1]), dim=1)
        alpha = torch.softmax(top.values / self.temperature, dim=1)
        return torch.zeros_like(best).scatter_(1, top.indices, alpha)
