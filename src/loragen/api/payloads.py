"""Adapters as bytes: the zipped PEFT directory served to clients, and uploads read back safely."""

from __future__ import annotations

import io
import json
import zipfile

from safetensors.torch import save

from ..adapters import AdapterFormatError, Lora, peft_config
from ..adapters.lora import CONFIG_NAME, WEIGHTS_NAME
from ..errors import LoragenError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def weights_bytes(lora: Lora) -> bytes:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in lora.state_dict().items()}
    return save(tensors, metadata={"format": "pt"})


def adapter_zip(lora: Lora) -> bytes:
    """The files `Lora.save_pretrained` writes, zipped (stored: float weights do not compress)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(CONFIG_NAME, json.dumps(peft_config(lora.spec), indent=2) + "\n")
        zf.writestr(WEIGHTS_NAME, weights_bytes(lora))
        if lora.metadata:
            zf.writestr("loragen.json", json.dumps(lora.metadata, indent=2, default=str))
    return buffer.getvalue()


def looks_like_safetensors(data: bytes) -> bool:
    """A u64 little-endian header length that fits the data, then a JSON object."""
    size = int.from_bytes(data[:8], "little") if len(data) >= 10 else 0
    return 2 <= size <= len(data) - 8 and data[8:9] == b"{"


def looks_like_pickle(data: bytes, filename: str | None) -> bool:
    """A pickle's name, or its bytes: the PROTO opcode 0x80, or torch.save's zip ("PK"). A header
    length's low byte can be 0x80 too, so bytes shaped like safetensors are never taken for one."""
    if (filename or "").lower().endswith(PICKLE_SUFFIXES):
        return True
    return not looks_like_safetensors(data) and (data[:1] == b"\x80" or data[:2] == b"PK")


def read_upload(config: bytes, weights: bytes, weights_name: str | None) -> Lora:
    """A `Lora` from uploaded `adapter_config.json` and `adapter_model.safetensors` bytes.

    Read in memory: errors say what is wrong with the upload, never where the server keeps it.
    """
    if looks_like_pickle(weights, weights_name):
        raise AdapterFormatError("the uploaded weights are a pickle, which can run code when loaded; "
                                 f"upload {WEIGHTS_NAME} (convert with safetensors)")
    if not looks_like_safetensors(weights):
        raise AdapterFormatError(f"the uploaded weights are not a safetensors file; upload {WEIGHTS_NAME}")
    try:
        return Lora.from_bytes(config, weights, "the uploaded adapter")
    except LoragenError:
        raise
    except (ValueError, TypeError, KeyError, OverflowError) as exc:  # e.g. "base_model_name_or_path": {}
        raise AdapterFormatError(f"the uploaded adapter is malformed: {exc}") from exc
