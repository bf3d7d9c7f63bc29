"""A downloaded LoRA as PEFT adapter files held in memory, and the upload of an adapter directory.

Torch-free: the bytes are the files PEFT reads (`adapter_config.json`, `adapter_model.safetensors`,
and loragen's `loragen.json` metadata). `save_pretrained` writes them as a directory that
`peft.PeftModel.from_pretrained` loads; only `to_lora` and `merge_into` need loragen's full
install (torch), and import it when called.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..adapters import Lora

# PEFT's file names (`peft.utils.constants`), and loragen's metadata beside them.
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
METADATA_NAME = "loragen.json"
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, METADATA_NAME)


@dataclass(frozen=True)
class AdapterFiles:
    """A PEFT adapter's files by name; the config and the weights are always present."""

    files: dict[str, bytes] = field(repr=False)

    def __post_init__(self) -> None:
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if n not in self.files]
        if missing:
            raise ValueError(f"the adapter lacks {', '.join(missing)}")

    @classmethod
    def from_zip(cls, source: str | Path | IO[bytes]) -> AdapterFiles:
        """The adapter files of a zip (the service's `application/zip` answer); other members are
        ignored, and none is ever extracted under its own name."""
        with zipfile.ZipFile(source) as zf:
            names = set(zf.namelist())
            return cls({name: zf.read(name) for name in ADAPTER_FILES if name in names})

    @property
    def config(self) -> dict[str, Any]:
        """`adapter_config.json`: PEFT's LoraConfig (rank, alpha, target modules, base model)."""
        return dict(json.loads(self.files[CONFIG_NAME]))

    @property
    def weights(self) -> bytes:
        """`adapter_model.safetensors`: PEFT's state dict (`safetensors.torch.load` reads it)."""
        return self.files[WEIGHTS_NAME]

    @property
    def metadata(self) -> dict[str, Any]:
        """`loragen.json`: how the LoRA was made (method, neighbours, seed); empty when absent."""
        raw = self.files.get(METADATA_NAME)
        return dict(json.loads(raw)) if raw else {}

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the adapter directory PEFT loads; an existing one is replaced whole."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            for name, data in self.files.items():
                (tmp / name).write_bytes(data)
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    def to_lora(self) -> Lora:
        """loragen's `Lora` of these files; needs torch."""
        from ..adapters import Lora

        with tempfile.TemporaryDirectory(prefix="loragen-") as tmp:
            return Lora.from_pretrained(self.save_pretrained(Path(tmp) / "adapter"))

    def merge_into(self, model: Any) -> Any:
        """Add ΔW to a transformers model's weights in place; needs torch."""
        return self.to_lora().merge_into(model)


def adapter_upload(directory: str | Path) -> dict[str, tuple[str, bytes, str]]:
    """The multipart files of `POST /v1/experts` from a PEFT adapter directory."""
    directory = Path(directory)
    return {"adapter_config": (CONFIG_NAME, (directory / CONFIG_NAME).read_bytes(), "application/json"),
            "adapter_model": (WEIGHTS_NAME, (directory / WEIGHTS_NAME).read_bytes(), "application/octet-stream")}
