"""The registry's experts as a learned generator sees them: normalised LoRA tokens and prototypes.

A generator learns from every checkpoint of every expert but its `holdout`, and held-out experts
are invisible to it at inference too (never a neighbour), so a held-out task is really unseen.
Everything here is read from the registry on first use, so a generator that only decodes never
reads the checkpoints.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
from einops import einsum, reduce

from ..registry import Expert, Registry
from ..registry.index import normalised
from .cvae import normalise
from .decoder import TokenLayout
from .errors import GenerationError

Stats = tuple[list[torch.Tensor], list[torch.Tensor]]  # per group (T_g,) mean and std


class RegistryTokens:
    """The registry's experts (minus held-out ones) as normalised tokens, and their prototypes."""

    def __init__(self, registry: Registry, layout: TokenLayout, holdout: set[str]) -> None:
        self.registry, self.layout, self.holdout = registry, layout, set(holdout)

    @cached_property
    def experts(self) -> list[Expert]:
        """The experts the generator learns from, in its column order."""
        experts = [e for e in self.registry.experts() if e.name not in self.holdout]
        if not experts:
            raise GenerationError("no experts left to train or condition on")
        return experts

    @cached_property
    def ids(self) -> list[int]:
        return [e.id for e in self.experts]

    @cached_property
    def raw(self) -> list[list[dict[str, torch.Tensor]]]:
        """Per expert, its checkpoints' B (module -> (L, out, r))."""
        return [self.registry.checkpoints(e) for e in self.experts]

    def stats(self) -> Stats:
        tokens = self.layout.to_groups({m: torch.stack([c[m] for cps in self.raw for c in cps])
                                        for m in self.layout.spec.module_names})
        mean = [reduce(t, "c t w -> t", "mean") for t in tokens]
        std = [(reduce((t - m[:, None]) ** 2, "c t w -> t", "mean")).sqrt().clamp_min(1e-8) for t, m in zip(tokens, mean)]
        return mean, std

    def tokens(self, stats: Stats) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every checkpoint as normalised tokens per group (C, T_g, W_g), and each one's expert column (C,)."""
        flat = [c for cps in self.raw for c in cps]
        groups = self.layout.to_groups({m: torch.stack([c[m] for c in flat]) for m in self.layout.spec.module_names})
        owner = torch.tensor([i for i, cps in enumerate(self.raw) for _ in cps])
        return normalise(groups, *stats), owner

    def prototypes(self, stats: Stats) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per group (E, T_g, W_g): each expert's checkpoint mean and second moment (σ² + μ²)."""
        tokens, owner = self.tokens(stats)
        count = torch.bincount(owner).float()[:, None, None]
        onehot = torch.nn.functional.one_hot(owner).float()
        mean = [einsum(onehot, t, "c e, c t w -> e t w") / count for t in tokens]
        second = [einsum(onehot, t * t, "c e, c t w -> e t w") / count for t in tokens]
        return mean, second

    def descriptions(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """The descriptions of these experts: texts, unit registry-encoder embeddings and owners (expert ids)."""
        ids, owners, vecs = self.registry.store.embeddings(self.registry.dim)
        texts = dict(self.registry.store.descriptions())
        known = set(self.ids)
        keep = [i for i, o in enumerate(owners.tolist()) if o in known]
        return [texts[int(ids[i])] for i in keep], normalised(vecs[keep]), owners[keep]
