"""The HTTP service: `create_app(settings)` and its settings."""

from .app import create_app
from .settings import ApiSettings

__all__ = ["ApiSettings", "create_app"]
