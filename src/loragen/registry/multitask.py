"""The registry's multi-task LoRA: one PEFT adapter directory, `<registry>/multitask/`.

It is trained on all the registry's tasks at once (`loragen train multitask`) and lives in the
registry's basis, so it is only valid while that basis is: the basis digest is kept beside it and
checked on load.
"""

from __future__ import annotations

import torch

from ..adapters import Lora
from ..errors import LoragenError
from .registry import Registry

DIRECTORY = "multitask"


class MultitaskMissing(LoragenError, LookupError):
    """The registry has no (valid) multi-task LoRA."""


def save_multitask(registry: Registry, lora: Lora) -> None:
    """Store `lora` (whose A must be the registry's basis) as the registry's multi-task LoRA."""
    registry.spec.check_compatible(lora.spec)
    for m in registry.spec.module_names:
        if not torch.equal(lora.A[m].to(registry.basis.A[m]), registry.basis.A[m]):
            raise LoragenError("the multi-task LoRA must be trained in the registry's basis")
    meta = {**lora.metadata, "basis_sha256": registry.basis.sha256()}
    with registry.lock:
        Lora(lora.spec, lora.A, lora.B, meta).save_pretrained(registry.path / DIRECTORY)


def load_multitask(registry: Registry) -> Lora:
    directory = registry.path / DIRECTORY
    if not directory.is_dir():
        raise MultitaskMissing(f"the registry at {registry.path} has no multi-task LoRA; train one with "
                               f"`loragen train multitask --tasks TASKS.jsonl --registry {registry.path}`")
    lora = Lora.from_pretrained(directory)
    if lora.metadata.get("basis_sha256") != registry.basis.sha256():
        raise MultitaskMissing(f"the multi-task LoRA of {registry.path} was trained in another basis; train it again")
    return registry.basis.lora({m: b.float() for m, b in lora.B.items()}, lora.metadata)


def has_multitask(registry: Registry) -> bool:
    return (registry.path / DIRECTORY / "adapter_config.json").is_file()
