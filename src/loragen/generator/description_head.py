"""A linear map of description embeddings learned from the registry's own paraphrases.

MiniLM places a paraphrase of one task about as close to a description of a neighbouring task
("cycle the letters one step to the left" lands on the Caesar shifts): on the demo world the nearest
registry description of a held-back paraphrase often belongs to another task. A registry
with several descriptions per expert says which differences matter. The head W is trained with a
supervised contrastive loss (descriptions of one expert are positives), pulled towards the identity
by weight decay so that it only bends the space where the registry gives evidence. Defaults chosen
by leave-one-description-out cross-validation on the demo registry's descriptions (never the
held-back paraphrases): weight decay 0.01, temperature 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

WEIGHT_KEY = "description_head.weight"


@dataclass
class HeadConfig:
    weight_decay: float = 0.01
    temperature: float = 0.1
    steps: int = 300
    lr: float = 1e-2
    batch: int = 2048  # descriptions per step when the registry has more


class DescriptionHead:
    def __init__(self, weight: torch.Tensor, config: HeadConfig | None = None) -> None:
        self.weight = weight.detach().to(torch.float32).contiguous()
        self.config = config or HeadConfig()

    def project(self, vecs: np.ndarray) -> np.ndarray:
        """(n, dim) unit rows -> (n, dim) unit rows in the learned space."""
        out = torch.from_numpy(np.ascontiguousarray(vecs, dtype=np.float32)) @ self.weight
        return F.normalize(out, dim=1).numpy()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {WEIGHT_KEY: self.weight}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor],
                        config: HeadConfig | None = None) -> DescriptionHead | None:
        if WEIGHT_KEY not in tensors:
            return None
        return cls(tensors[WEIGHT_KEY], config)

    @classmethod
    def fit(cls, vecs: np.ndarray, owners: np.ndarray, config: HeadConfig | None = None, *,
            seed: int = 0) -> DescriptionHead | None:
        """None when fewer than two experts have two descriptions or more (nothing to learn from)."""
        config = config or HeadConfig()
        owners_t = torch.as_tensor(np.asarray(owners))
        _, inverse, counts = torch.unique(owners_t, return_inverse=True, return_counts=True)
        if int((counts >= 2).sum()) < 2:
            return None
        x = torch.from_numpy(np.ascontiguousarray(vecs, dtype=np.float32))
        eye = torch.eye(x.shape[1])
        gen = torch.Generator().manual_seed(seed)
        weight = torch.nn.Parameter(eye.clone())
        opt = torch.optim.Adam([weight], lr=config.lr, fused=True)
        for _ in range(config.steps):
            rows = torch.randperm(len(x), generator=gen)[: config.batch] if len(x) > config.batch else slice(None)
            loss = contrastive_loss(F.normalize(x[rows] @ weight, dim=1), inverse[rows], config.temperature)
            loss = loss + config.weight_decay * ((weight - eye) ** 2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return cls(weight, config)


def contrastive_loss(z: torch.Tensor, label: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over anchors with a positive of −mean log p(positive | anchor), p a softmax over the others."""
    sims = (z @ z.T) / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool)
    logp = sims.masked_fill(self_mask, -torch.inf).log_softmax(dim=1)
    positive = (label[:, None] == label[None, :]) & ~self_mask
    count = positive.sum(dim=1)
    keep = count > 0
    per_anchor = -(logp.masked_fill(~positive, 0.0)).sum(dim=1)[keep] / count[keep]
    return per_anchor.mean()
