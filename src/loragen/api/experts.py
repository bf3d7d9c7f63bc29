"""Expert routes' work, run on the engine thread (the registry's SQLite lives there)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from ..adapters import AdapterFormatError
from ..errors import ConflictError, NotFoundError
from ..registry import Expert, RegistryError
from .payloads import read_upload
from .service import Service


def expert_out(e: Expert) -> dict[str, Any]:
    d = asdict(e)
    for key in ("sha256", "checkpoints", "source_sha256"):
        d.pop(key)
    return d


def find(service: Service, key: str) -> Expert:
    try:
        return service.reg.get(key)
    except (RegistryError, OverflowError) as exc:  # OverflowError: an id past SQLite's 64-bit integers
        raise NotFoundError(f"no expert {key!r} in the registry") from exc


def page(service: Service, offset: int, limit: int) -> dict[str, Any]:
    experts = service.reg.experts()
    return {"data": [expert_out(e) for e in experts[offset:offset + limit]], "total": len(experts),
            "offset": offset, "limit": limit}


def remove(service: Service, key: str) -> dict[str, Any]:
    expert = find(service, key)
    service.reg.remove(expert)
    service.changed()
    return {"deleted": True, "id": expert.id, "name": expert.name}


def add(service: Service, name: str, descriptions: list[str], tags: list[str], config: bytes, weights: bytes,
        weights_name: str | None) -> dict[str, Any]:
    """Import an uploaded PEFT LoRA; every check runs before the registry writes anything.

    The adapter may target a subset of the registry's modules; the answer lists the others
    (imported with zero ΔW) in `absent_modules`."""
    reg = service.reg
    name = name.strip()
    if any(e.name == name for e in reg.experts()):
        raise ConflictError(f"an expert named {name!r} already exists; delete it first or pick another name")
    lora = read_upload(config, weights, weights_name)
    if not all(bool(torch.isfinite(t).all()) for t in [*lora.A.values(), *lora.B.values()]):
        raise AdapterFormatError("the uploaded adapter holds NaN or infinite values")
    expert, projection = reg.import_adapter(lora, name, descriptions, tags=tags)
    service.changed()
    out = expert_out(expert)
    out["fidelity"] = projection.fidelity
    out["absent_modules"] = list(projection.absent_modules)
    return out
