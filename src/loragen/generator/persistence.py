"""A learned generator's checkpoint directory: `config.json` and `model.safetensors`.

`config.json` is a `CheckpointConfig` (either of its layouts). `model.safetensors` holds the CVAE's
weights and buffers (float32), the safety ranges (`safety.`), and the description head
(`description_head.`) and tuned encoder layers (`description_encoder.`) when there are any.
With a tuned encoder, `description_vectors.safetensors` keeps the registry's descriptions as that
encoder read them (unit rows, texts in its metadata), so that a load does not encode them again;
a checkpoint without it still loads, and encodes them.
A directory being trained also holds the resumable training state, which saving keeps.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..adapters import atomic
from ..registry import Registry
from .config import CheckpointConfig, saved_method
from .cvae import LoraCVAE
from .decoder import TokenLayout
from .description_encoder import PREFIX as ENCODER_PREFIX
from .description_encoder import DescriptionEncoder
from .description_head import DescriptionHead
from .errors import GenerationError
from .safety import Safety
from .space import KnownVectors

STATE_NAME = "training_state.pt"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
VECTORS_NAME = "description_vectors.safetensors"
EXTRA_PREFIXES = ("safety.", "description_head.", ENCODER_PREFIX)


@dataclass
class Checkpoint:
    """The parts of a generator a checkpoint holds."""

    config: CheckpointConfig
    model: LoraCVAE
    safety: Safety
    head: DescriptionHead | None = None
    encoder: DescriptionEncoder | None = None
    known_vectors: KnownVectors | None = None  # texts the tuned encoder read, and its unit rows

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.model.state_dict().items()}
        state.update({k: v.contiguous() for k, v in self.safety.state_dict().items()})
        for extra in (self.head, self.encoder):
            if extra is not None:
                state.update(extra.state_dict())
        return state


def save(checkpoint: Checkpoint, directory: str | Path) -> Path:
    """Write `checkpoint` to `directory` atomically, keeping a resumable training state there."""
    directory = Path(directory)
    with atomic.directory(directory) as tmp:
        save_file(checkpoint.state_dict(), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(checkpoint.config.to_json(), indent=2) + "\n")
        if checkpoint.known_vectors is not None:
            texts, vecs = checkpoint.known_vectors
            save_file({"vectors": torch.from_numpy(np.ascontiguousarray(vecs, dtype=np.float32))},
                      str(tmp / VECTORS_NAME), metadata={"texts": json.dumps(texts)})
        if (directory / STATE_NAME).is_file():
            shutil.copy2(directory / STATE_NAME, tmp / STATE_NAME)
    return directory


def load(directory: str | Path, registry: Registry) -> Checkpoint:
    """Read a checkpoint for `registry`; a `GenerationError` if it is none or was trained for another
    base model, rank, basis or text encoder."""
    directory = Path(directory)
    try:
        data = json.loads((directory / CONFIG_NAME).read_text())
        tensors = load_file(str(directory / WEIGHTS_NAME))
    except (OSError, ValueError) as exc:
        raise GenerationError(f"{directory} is not a loragen generator checkpoint: {exc}") from exc
    config = CheckpointConfig.from_json(data, f"{directory}/{CONFIG_NAME}")
    config.check_compatible(registry, str(directory))
    model = LoraCVAE(TokenLayout(registry.spec), config.cvae, config.condition_dim)
    model_state = {k: v for k, v in tensors.items() if not k.startswith(EXTRA_PREFIXES)}
    for name, buffer in model.named_buffers():  # checkpoints without condition centring: the identity
        if name.startswith("text_") and name not in model_state:
            model_state[name] = buffer
    try:
        model.load_state_dict(model_state)
    except RuntimeError as exc:
        raise GenerationError(f"{directory}: weights do not fit the registry's spec: {exc}") from exc
    encoder = DescriptionEncoder.from_state_dict(registry.encoder, tensors, config.description_encoder)
    return Checkpoint(config, model, Safety.from_state_dict(tensors, config.ood_threshold),
                      DescriptionHead.from_state_dict(tensors, config.description_head), encoder,
                      _known_vectors(directory) if encoder is not None else None)


def _known_vectors(directory: Path) -> KnownVectors | None:
    """The saved description vectors, or None when there are none that can be read (they are a
    cache: the descriptions are then encoded)."""
    try:
        with safe_open(str(directory / VECTORS_NAME), "np") as f:
            texts = json.loads((f.metadata() or {})["texts"])
            vecs = f.get_tensor("vectors")
    except (OSError, ValueError, KeyError, SafetensorError):
        return None
    if not isinstance(texts, list) or vecs.ndim != 2 or len(texts) != len(vecs):
        return None
    return texts, vecs


def read_method(directory: str | Path) -> str | None:
    """The method named by `directory`'s config.json, or None when it has none that can be read."""
    try:
        return saved_method(json.loads((Path(directory) / CONFIG_NAME).read_text()))
    except (OSError, ValueError):
        return None

