"""Checks on generated LoRAs: finite values, ΔW norms inside the registry's range, OOD requests.

- Non-finite B (NaN/Inf) fails the whole request with `GenerationError`.
- Each (layer, module) B is rescaled into [min, max] of ‖B‖ over every training checkpoint of that
  (layer, module). The basis A has orthonormal rows, so ‖ΔW‖ = scaling · ‖B‖ and clipping ‖B‖
  clips ‖ΔW‖.
- OOD threshold, calibrated leave-one-out in the generator's description space: for every registry
  description, its best similarity to a description of *another* expert; the threshold is the 5th
  percentile of those. A request whose nearest expert is less similar than that is further from the
  registry than 95 % of the registry's own tasks are from each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from einops import reduce

from .errors import GenerationError

OOD_PERCENTILE = 5.0


@dataclass
class Safety:
    norm_min: dict[str, torch.Tensor]  # module -> (L,)
    norm_max: dict[str, torch.Tensor]
    ood_threshold: float

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"safety.min.{m}": v for m, v in self.norm_min.items()}
        out.update({f"safety.max.{m}": v for m, v in self.norm_max.items()})
        return out

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], ood_threshold: float) -> Safety:
        lo = {k.removeprefix("safety.min."): v for k, v in tensors.items() if k.startswith("safety.min.")}
        hi = {k.removeprefix("safety.max."): v for k, v in tensors.items() if k.startswith("safety.max.")}
        return cls(lo, hi, ood_threshold)

    @staticmethod
    def norms(B: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per module, (N, L) float32 ‖B‖ of each (request, layer), without an fp32 copy of B.
        A NaN or Inf anywhere in a B makes its norm non-finite, so this one pass serves both checks."""
        return {m: torch.linalg.vector_norm(b, dim=(-2, -1), dtype=torch.float32) for m, b in B.items()}

    def check_finite(self, B: dict[str, torch.Tensor], descriptions: list[str],
                     norms: dict[str, torch.Tensor] | None = None) -> None:
        """One device sync for the whole batch, whatever the number of modules."""
        norms = norms if norms is not None else self.norms(B)
        finite = torch.stack([torch.isfinite(n).all(dim=1) for n in norms.values()], dim=1)  # (N, M)
        if bool(finite.all()):
            return
        i, j = (int(x) for x in (~finite).nonzero()[0])
        raise GenerationError(
            f"the generator produced non-finite weights (NaN/Inf) in {list(norms)[j]} for description "
            f"{descriptions[i % len(descriptions)]!r}; the generator checkpoint is likely corrupt"
        )

    def clip(self, B: dict[str, torch.Tensor],
             norms: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Rescale each (request, layer, module) B into the registry's norm range.

        Returns the clipped Bs (same dtype) and a (N,) bool tensor: whether request i was clipped.
        All modules are decided together: one device sync per batch; a batch with nothing to clip
        is returned as it is."""
        norms = norms if norms is not None else self.norms(B)
        names = list(B)
        norm = torch.stack([norms[m] for m in names], dim=-1)  # (N, L, M)
        device = norm.device
        lo = torch.stack([self.norm_min[m] for m in names], dim=-1).to(device)
        hi = torch.stack([self.norm_max[m] for m in names], dim=-1).to(device)
        # A relative tolerance, so that values at the edge of the range are not reported.
        hit = (norm < lo * (1 - 1e-4)) | (norm > hi * (1 + 1e-4))
        clipped = hit.any(dim=2).any(dim=1)
        if not bool(clipped.any()):
            return B, clipped
        target = torch.minimum(torch.maximum(norm, lo), hi)
        scale = torch.where(hit, target / norm.clamp_min(1e-12), torch.ones_like(norm))
        out = {m: (B[m].float() * scale[..., j, None, None]).to(B[m].dtype) for j, m in enumerate(names)}
        return out, clipped

    def is_ood(self, nearest_similarity: float) -> bool:
        return nearest_similarity < self.ood_threshold


def norm_range(checkpoints: list[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per module, (L,) min and max of ‖B‖ over the given checkpoints."""
    lo, hi = {}, {}
    for m in checkpoints[0]:
        norms = torch.stack([reduce(c[m].float() ** 2, "l o r -> l", "sum").sqrt() for c in checkpoints])
        lo[m], hi[m] = norms.min(dim=0).values, norms.max(dim=0).values
    return lo, hi


def calibrate_ood(vecs: torch.Tensor, owners: torch.Tensor) -> float:
    """The 5th percentile of each description's best similarity to another expert's description;
    `vecs` are unit rows in the space requests are scored in, `owners` each row's expert."""
    if len(torch.unique(owners)) < 2:
        return -1.0  # nothing to compare with: never flag
    sims = (vecs @ vecs.T).masked_fill(owners[:, None] == owners[None, :], -torch.inf)
    return float(np.percentile(sims.max(dim=1).values.numpy(), OOD_PERCENTILE))
