"""What the registry hands out: `Expert` rows, search `Hit`s, and `RegistryError`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import LoragenError

BASIS_NAME = "basis.safetensors"  # the registry's current basis, beside its database


class RegistryError(LoragenError, ValueError):
    """The registry is missing, corrupt, or the request does not fit it."""


@dataclass
class Expert:
    id: int
    name: str
    base_model: str
    rank: int
    alpha: float
    targets: list[str] | str
    sha256: str  # the final checkpoint's blob
    created: str
    metrics: dict[str, Any]
    tags: list[str]
    descriptions: list[str]
    checkpoints: list[str]  # blob sha256s, oldest first
    fidelity: float | None
    source_sha256: str | None


@dataclass
class Hit:
    expert_id: int
    name: str
    description: str
    similarity: float


def best_per_expert(sims: np.ndarray, ids: np.ndarray, info: dict[int, tuple[int, str, str]], k: int) -> list[Hit]:
    """The first `k` distinct experts of one query's description hits (sorted best first), each with
    its best-matching description; `info`: description id -> (expert id, name, text)."""
    hits: dict[int, Hit] = {}
    for sim, i in zip(sims, ids):  # already sorted by similarity, best first
        if i < 0 or int(i) not in info:
            continue
        expert_id, name, text = info[int(i)]
        if expert_id not in hits:
            hits[expert_id] = Hit(expert_id, name, text, float(sim))
            if len(hits) == k:
                break
    return list(hits.values())
