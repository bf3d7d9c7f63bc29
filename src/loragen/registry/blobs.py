"""Content-addressed safetensors files under a registry's `blobs/`, named by their sha256.

A blob is written to a temp file and renamed, so it is whole or absent; an orphan blob (written
before a transaction that never committed) is harmless, and reading checks every byte against the
name, so a corrupt or missing blob is refused rather than loaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from ..adapters import atomic
from .records import RegistryError


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_checked(path: Path, sha: str, what: str) -> bytes:
    """A content-addressed file's bytes, refused when missing or not matching its sha256."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RegistryError(f"{what} {path} is missing") from exc
    if sha256(data) != sha:
        raise RegistryError(f"{what} {path} is corrupt (sha256 mismatch)")
    return data


class Blobs:
    """The checkpoint and basis blobs of the registry at `root`."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "blobs"

    def path(self, sha: str) -> Path:
        return self.dir / f"{sha}.safetensors"

    def basis_path(self, sha: str) -> Path:
        return self.dir / f"basis-{sha}.safetensors"

    def read(self, sha: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """A blob's tensors and its safetensors metadata."""
        path = self.path(sha)
        data = read_checked(path, sha, "blob")
        try:
            tensors = load(data)
            # The metadata comes from the checksummed bytes, not a second read of the file (which a
            # writer's garbage collection may have removed): safetensors' `safe_open` reads files only.
            # Layout: u64 header length, then a JSON header holding __metadata__.
            header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        except (SafetensorError, ValueError) as exc:
            raise RegistryError(f"blob {path} is unreadable: {exc}") from exc
        return tensors, dict(header.get("__metadata__") or {})

    def write(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
        data = save(tensors, metadata={"format": "pt", **(metadata or {})})
        sha = sha256(data)
        atomic.write_bytes(self.path(sha), data)
        return sha

    def write_basis(self, data: bytes) -> str:
        sha = sha256(data)
        atomic.write_bytes(self.basis_path(sha), data)
        return sha

    def delete(self, shas: set[str]) -> None:
        for sha in shas:
            self.path(sha).unlink(missing_ok=True)
