"""The expert registry: SQLite metadata, content-addressed safetensors blobs, a FAISS index."""

from .registry import Expert, Hit, Registry, RegistryError

__all__ = ["Expert", "Hit", "Registry", "RegistryError"]
