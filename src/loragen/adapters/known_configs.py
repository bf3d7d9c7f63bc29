"""Transformers config dicts of real LLMs (shapes only, no weights), for specs and speed benchmarks.

The values are those of the models' published `config.json` files, reduced to what fixes the
shapes of the linear layers (plus a few fields that keep `AutoConfig` from guessing).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from .spec import SpecError

KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3-8b": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001,
    },
    "qwen2.5-0.5b": {
        "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True, "use_sliding_window": False,
        "bos_token_id": 151643, "eos_token_id": 151643,
    },
    "mistral-7b": {
        "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
        "max_position_embeddings": 32768, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "sliding_window": 4096, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    },
}


def known_config(name: str) -> dict[str, Any]:
    """A fresh copy of a named config (callers may edit it)."""
    key = name.lower()
    if key not in KNOWN_CONFIGS:
        raise SpecError(f"unknown model config {name!r}; known: {', '.join(KNOWN_CONFIGS)}, "
                        "or a path to a config.json or model directory")
    return copy.deepcopy(KNOWN_CONFIGS[key])


def resolve_model_config(name_or_path: str | Path) -> dict[str, Any]:
    """A config dict for `spec_from_config`: a known name, a config.json, or a directory holding one."""
    if isinstance(name_or_path, str) and name_or_path.lower() in KNOWN_CONFIGS:
        return known_config(name_or_path)
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        return known_config(str(name_or_path))  # raises, listing the known names
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SpecError(f"cannot read model config {path}: {exc}") from exc
    if not isinstance(config, dict) or not config.get("model_type"):
        raise SpecError(f"{path} is not a transformers config (no 'model_type')")
    return config
