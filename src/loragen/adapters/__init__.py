"""The LoRA data model: spec from a config, PEFT read/write, the shared basis, merge and apply."""

from .apply import LoraStack, Rows, applied
from .basis import Basis, Projection
from .lora import AdapterFormatError, Lora, MergedLora, peft_config
from .spec import LoraSpec, ModuleSpec, SpecError, load_config, spec_from_config

__all__ = [
    "AdapterFormatError",
    "Basis",
    "Lora",
    "LoraSpec",
    "LoraStack",
    "MergedLora",
    "ModuleSpec",
    "Projection",
    "Rows",
    "SpecError",
    "applied",
    "load_config",
    "peft_config",
    "spec_from_config",
]
