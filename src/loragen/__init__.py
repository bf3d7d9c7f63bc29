"""loragen: LoRA adapters generated from natural-language task descriptions."""

__version__ = "0.1.0"
