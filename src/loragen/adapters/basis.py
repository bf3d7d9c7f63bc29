"""The shared basis (DESIGN §4): one frozen A per (layer, module), so ΔW is linear in B.

Every basis has orthonormal rows, so its pseudo-inverse is its transpose and projecting a foreign
adapter is an orthogonal projection: `B' = ΔW A₀ᵀ / s₀`, with the lost energy as its error.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from einops import einsum, rearrange
from safetensors.torch import load, save

from . import atomic
from .lora import Lora
from .spec import LoraSpec, SpecError


@dataclass
class Projection:
    B: dict[str, torch.Tensor]
    relative_error: float  # ‖ΔW − ΔW'‖ / ‖ΔW‖ over all modules and layers
    module_errors: dict[str, float]
    absent_modules: tuple[str, ...] = ()  # modules the adapter did not target: their B is zero

    @property
    def fidelity(self) -> float:
        return max(0.0, 1.0 - self.relative_error)


@dataclass
class Basis:
    spec: LoraSpec
    A: dict[str, torch.Tensor]  # module -> (L, r, in), orthonormal rows, float32

    @classmethod
    def seeded(cls, spec: LoraSpec, seed: int = 0) -> Basis:
        """A reproducible random orthonormal basis: the same spec and seed give the same A."""
        A = {}
        for i, m in enumerate(spec.modules):
            if spec.rank > m.in_features:
                raise SpecError(f"rank {spec.rank} exceeds the input width of {m.name}")
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
            gauss = torch.randn(spec.num_layers, m.in_features, spec.rank, generator=gen)
            q, _ = torch.linalg.qr(gauss.double())
            A[m.name] = rearrange(q, "l i r -> l r i").float().contiguous()
        return cls(spec, A)

    def orthonormalized(self) -> tuple[Basis, dict[str, torch.Tensor]]:
        """The basis of the same span with orthonormal rows, and per module the (L, r, r) matrix
        that carries a B over to it: with Aᵀ = QR, A' = Qᵀ and B' = B Rᵀ, so B'A' = BA."""
        A, carry = {}, {}
        for name, a in self.A.items():
            q, r = torch.linalg.qr(rearrange(a.double(), "l r i -> l i r"))
            A[name] = rearrange(q, "l i r -> l r i").float().contiguous()
            carry[name] = rearrange(r, "l r s -> l s r")
        return Basis(self.spec, A), carry

    def lora(self, B: dict[str, torch.Tensor], metadata: dict | None = None) -> Lora:
        A = {k: v.to(B[k].device, B[k].dtype) for k, v in self.A.items()}
        return Lora(self.spec, A, B, dict(metadata or {}))

    def zeros_b(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        s = self.spec
        return {m.name: torch.zeros(s.num_layers, m.out_features, s.rank, dtype=dtype) for m in s.modules}

    def project(self, lora: Lora) -> Projection:
        """Express `lora`'s ΔW in this basis; exact when its A rows lie in the basis' span.

        Modules are matched by name and shape, in any order. An adapter may target a subset of the
        basis' modules: the others get zero B (no ΔW) and are listed in `absent_modules`. A module
        or layer count the basis lacks raises `SpecError`.
        """
        absent = self.spec.check_compatible(lora.spec, allow_subset=True)
        lora = lora.on_modules(self.spec)
        B, errors = {}, {}
        lost = total = 0.0
        for m in self.spec.modules:
            a = lora.A[m.name].double()
            b = lora.B[m.name].double()
            a0 = self.A[m.name].double()
            coords = einsum(a, a0, "l r i, l q i -> l r q")  # A A₀ᵀ
            proj = lora.spec.scaling * einsum(b, coords, "l o r, l r q -> l o q")  # ΔW A₀ᵀ
            B[m.name] = (proj / self.spec.scaling).float()
            # ‖ΔW − PA₀‖² = ‖ΔW‖² − 2‖P‖² + ‖PA₀‖² with P = ΔW A₀ᵀ; exact even though A₀ is
            # only orthonormal to float32 precision. Nothing of size (out, in) is formed.
            gram_b = einsum(b, b, "l o r, l o q -> l r q")
            gram_a = einsum(a, a, "l r i, l q i -> l r q")
            energy = lora.spec.scaling**2 * float(einsum(gram_b, gram_a, "l r q, l r q ->"))
            kept = float(proj.pow(2).sum())
            gram_p = einsum(proj, proj, "l o r, l o q -> l r q")
            gram_a0 = einsum(a0, a0, "l r i, l q i -> l r q")
            rebuilt = float(einsum(gram_p, gram_a0, "l r q, l r q ->"))
            lost_m = max(energy - 2 * kept + rebuilt, 0.0)
            errors[m.name] = math.sqrt(lost_m / energy) if energy > 0 else 0.0
            lost, total = lost + lost_m, total + energy
        rel = math.sqrt(lost / total) if total > 0 else 0.0
        return Projection(B, rel, errors, tuple(absent))

    @classmethod
    def rebased(cls, spec: LoraSpec, loras: Iterable[Lora], rank: int) -> Basis:
        """Top right-singular directions of all experts' ΔW, per (layer, module), at `rank`."""
        grams = {m.name: torch.zeros(spec.num_layers, m.in_features, m.in_features, dtype=torch.float64) for m in spec.modules}
        count = 0
        for lora in loras:
            spec.check_compatible(lora.spec)
            count += 1
            for m in spec.modules:
                a = lora.A[m.name].double()
                b = lora.B[m.name].double()
                gram_b = einsum(b, b, "l o r, l o q -> l r q")
                # ΔWᵀΔW = s² Aᵀ (BᵀB) A, accumulated without forming ΔW.
                grams[m.name] += lora.spec.scaling**2 * einsum(a, gram_b, a, "l r i, l r q, l q j -> l i j")
        if count == 0:
            raise SpecError("a rebase needs at least one expert")
        new_spec = spec.with_rank(rank)
        A = {}
        for m in spec.modules:
            if rank > m.in_features:
                raise SpecError(f"rank {rank} exceeds the input width {m.in_features} of {m.name}")
            _, vecs = torch.linalg.eigh(grams[m.name])  # ascending eigenvalues
            top = rearrange(vecs[..., -rank:].flip(-1), "l i r -> l r i")
            # Fix each direction's sign so a rebase is deterministic.
            idx = top.abs().argmax(dim=-1, keepdim=True)
            top = top * torch.sign(torch.gather(top, -1, idx))
            A[m.name] = top.float().contiguous()
        return cls(new_spec, A)

    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def to_bytes(self) -> bytes:
        return save({k: v.contiguous() for k, v in self.A.items()}, metadata={"format": "pt"})

    def save(self, path: Path) -> None:
        atomic.write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: Path, spec: LoraSpec) -> Basis:
        A = load(Path(path).read_bytes())
        basis = cls(spec, A)
        for m in spec.modules:
            if m.name not in A or tuple(A[m.name].shape) != (spec.num_layers, spec.rank, m.in_features):
                raise SpecError(f"basis file {path} does not match the spec for {m.name}")
        return basis
