"""Rebasing a registry: a data-driven basis from its experts' own ΔW (DESIGN §4).

Per (layer, module) the new basis is the top right-singular directions of every expert's original
ΔW stacked; every checkpoint is re-projected onto it and each expert's fidelity recorded. The new
blobs are written before the one transaction that switches the registry over, so a crash leaves
the old basis in force.
"""

from __future__ import annotations

import json
from typing import Any

from ..adapters import Basis, SpecError, atomic
from .records import BASIS_NAME, Expert, RegistryError


def rebase(registry: Any, rank: int) -> list[tuple[Expert, float]]:
    """Switch `registry` (a `Registry`, which calls this; typed loosely so that this module does
    not import it back) to a basis of `rank` built from its experts; returns (expert, fidelity) each."""
    experts = registry.experts()
    if not experts:
        raise RegistryError("a rebase needs at least one expert")
    originals = [registry.original(e) for e in experts]
    try:
        new = Basis.rebased(registry.spec, originals, rank)
    except SpecError as exc:
        raise RegistryError(str(exc)) from exc
    basis_bytes = new.to_bytes()
    basis_sha = registry.blobs.write_basis(basis_bytes)
    updates = []
    for e, original in zip(experts, originals):
        projections = [new.project(registry.basis.lora(B)) for B in registry.checkpoints(e)[:-1]]
        final = new.project(original)
        shas = [registry.blobs.write(p.B) for p in [*projections, final]]
        updates.append((e, shas, final.fidelity))
    old_blobs = {sha for e in experts for sha in e.checkpoints}
    old_basis = registry.store.meta()["basis_sha256"]
    with registry.store.transaction():
        registry.store.set_meta("spec", json.dumps(new.spec.to_dict()))
        registry.store.set_meta("basis_sha256", basis_sha)
        for e, shas, fidelity in updates:
            registry.store.set_checkpoints(e.id, shas)
            registry.store.update_expert(e.id, sha256=shas[-1], fidelity=fidelity, rank=new.spec.rank,
                                     alpha=new.spec.alpha, targets=new.spec.target_modules)
    registry.spec, registry.basis = new.spec, new
    atomic.write_bytes(registry.path / BASIS_NAME, basis_bytes)
    registry._collect(old_blobs)
    if old_basis != basis_sha:
        registry.blobs.basis_path(old_basis).unlink(missing_ok=True)
    return [(registry.get(e.id), fidelity) for e, _, fidelity in updates]
