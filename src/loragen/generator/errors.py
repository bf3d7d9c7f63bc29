"""The generator package's error: a generation request that cannot be served."""

from __future__ import annotations

from ..errors import LoragenError


class GenerationError(LoragenError, ValueError):
    """A generation request cannot be served."""
