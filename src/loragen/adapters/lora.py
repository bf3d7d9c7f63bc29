"""`Lora`: the tensors of one LoRA adapter plus its spec, read and written in PEFT's format.

Tensors are stacked over layers: `A[module]` is (L, r, in) and `B[module]` is (L, out, r), so the
delta of every layer comes out of one einsum.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from einops import einsum
from safetensors import SafetensorError
from safetensors.torch import load, save_file
from torch import nn

from ..errors import LoragenError
from . import atomic
from .spec import LoraSpec, SpecError, spec_from_state_dict

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")


class AdapterFormatError(LoragenError, ValueError):
    """A file is not a PEFT LoRA adapter loragen can read."""


def peft_config(spec: LoraSpec) -> dict[str, Any]:
    """The `adapter_config.json` of a spec: uniform r and alpha, no DoRA, no modules_to_save."""
    return {
        "peft_type": "LORA",
        "task_type": spec.task_type,
        "base_model_name_or_path": spec.base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "target_modules": spec.target_modules,
        "fan_in_fan_out": spec.fan_in_fan_out,
        "bias": "none",
        "use_rslora": spec.use_rslora,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
    }


@dataclass
class Lora:
    spec: LoraSpec
    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = self.spec
        for m in s.modules:
            if m.name not in self.A or m.name not in self.B:
                raise SpecError(f"missing tensors for module {m.name!r}")
            want_a = (s.num_layers, s.rank, m.in_features)
            want_b = (s.num_layers, m.out_features, s.rank)
            if tuple(self.A[m.name].shape) != want_a or tuple(self.B[m.name].shape) != want_b:
                raise SpecError(
                    f"{m.name}: A {tuple(self.A[m.name].shape)} / B {tuple(self.B[m.name].shape)}, "
                    f"expected {want_a} / {want_b}"
                )

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.B.values())).dtype

    def to(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> Lora:
        A = {k: v.to(device=device, dtype=dtype) for k, v in self.A.items()}
        B = {k: v.to(device=device, dtype=dtype) for k, v in self.B.items()}
        return Lora(self.spec, A, B, dict(self.metadata))

    def delta(self, module: str, layer: int | None = None) -> torch.Tensor:
        """ΔW = scaling · B @ A in nn.Linear's (out, in) layout; all layers when `layer` is None."""
        self.spec.module(module)
        a, b = self.A[module], self.B[module]
        if layer is not None:
            a, b = a[layer], b[layer]
        return self.spec.scaling * einsum(b, a, "... o r, ... r i -> ... o i")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT's keys: `base_model.model.<path>.lora_A.weight` (r, in) and `lora_B` (out, r)."""
        out: dict[str, torch.Tensor] = {}
        for m in self.spec.modules:
            for layer in range(self.spec.num_layers):
                path = f"base_model.model.{self.spec.module_path(layer, m.name)}"
                out[f"{path}.lora_A.weight"] = self.A[m.name][layer].contiguous()
                out[f"{path}.lora_B.weight"] = self.B[m.name][layer].contiguous()
        return out

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write a PEFT adapter directory atomically (the old one, if any, is replaced whole)."""
        directory = Path(directory)
        tensors = {k: v.detach().to("cpu", dtype or v.dtype) for k, v in self.state_dict().items()}
        with atomic.directory(directory) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            (tmp / CONFIG_NAME).write_text(json.dumps(peft_config(self.spec), indent=2) + "\n")
            if self.metadata:
                (tmp / "loragen.json").write_text(json.dumps(self.metadata, indent=2, default=str))
        return directory

    def on_modules(self, spec: LoraSpec, what: str = "adapter") -> Lora:
        """This adapter over every module of `spec`, in `spec`'s order, with zero factors (so ΔW = 0)
        on the modules it does not target; its rank, alpha, rsLoRA setting and base model are kept.

        Raises `SpecError` when its layers, or any module it targets, do not fit `spec`.
        """
        spec.check_compatible(self.spec, what, allow_subset=True)
        full = replace(spec, rank=self.spec.rank, alpha=self.spec.alpha, use_rslora=self.spec.use_rslora,
                       base_model=self.spec.base_model or spec.base_model)
        ref = next(iter(self.B.values()))
        A, B = {}, {}
        for m in spec.modules:
            if m.name in self.A:
                A[m.name], B[m.name] = self.A[m.name], self.B[m.name]
            else:
                A[m.name] = ref.new_zeros(spec.num_layers, full.rank, m.in_features)
                B[m.name] = ref.new_zeros(spec.num_layers, m.out_features, full.rank)
        return Lora(full, A, B, dict(self.metadata))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Lora:
        """Read a PEFT adapter directory (safetensors only: a pickle is refused, never loaded)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise AdapterFormatError(f"no adapter directory at {directory}")
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            pickles = [n for n in PICKLE_NAMES if (directory / n).exists()]
            if pickles:
                raise AdapterFormatError(
                    f"{directory / pickles[0]} is a pickle file, which can run code when loaded; "
                    f"loragen reads only {WEIGHTS_NAME} (convert it with safetensors)"
                )
            raise AdapterFormatError(f"{directory} has no {WEIGHTS_NAME}")
        config = read_config(directory)
        metadata: dict[str, Any] = {}
        meta_file = directory / "loragen.json"
        if meta_file.is_file():
            try:
                metadata = json.loads(meta_file.read_text())
            except (ValueError, RecursionError) as exc:
                raise AdapterFormatError(f"{meta_file} is not valid JSON") from exc
            if not isinstance(metadata, dict):
                raise AdapterFormatError(f"{meta_file} must hold a JSON object")
        return cls.from_parts(config, weights.read_bytes(), str(directory), metadata)

    @classmethod
    def from_bytes(cls, config: bytes, weights: bytes, where: str = "the adapter") -> Lora:
        """An adapter from the bytes of its `adapter_config.json` and `adapter_model.safetensors`.

        Nothing touches the disk, and error messages name `where` (e.g. "the uploaded adapter"),
        never a file path. Raises `AdapterFormatError` saying what is wrong with the input.
        """
        return cls.from_parts(parse_config(config, f"{where}: {CONFIG_NAME}"), weights, where)

    @classmethod
    def from_parts(cls, config: dict[str, Any], weights: bytes, where: str,
                   metadata: dict[str, Any] | None = None) -> Lora:
        """An adapter from its checked config (`parse_config`) and safetensors bytes."""
        try:
            tensors = load(weights)
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterFormatError(f"{where}: {WEIGHTS_NAME} is corrupt or truncated: {exc}") from exc
        try:
            spec, stacked = spec_from_state_dict(tensors, config)
        except SpecError as exc:
            raise AdapterFormatError(f"{where}: {exc}") from exc
        A = {m.name: stacked[f"A:{m.name}"] for m in spec.modules}
        B = {m.name: stacked[f"B:{m.name}"] for m in spec.modules}
        return cls(spec, A, B, dict(metadata or {}))

    def merge_into(self, model: nn.Module) -> MergedLora:
        """Add ΔW to the model's weights in place; the handle's `unmerge()` restores them bitwise."""
        modules = resolve_modules(model, self.spec)
        originals: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for m in self.spec.modules:
                deltas = self.delta(m.name)  # every layer in one einsum
                for layer in range(self.spec.num_layers):
                    path = self.spec.module_path(layer, m.name)
                    weight = modules[path].weight
                    originals[path] = weight.detach().clone()
                    d = deltas[layer].T if m.conv1d else deltas[layer]
                    weight.add_(d.to(weight.device, weight.dtype))
        return MergedLora(modules, originals)

    @contextmanager
    def merged(self, model: nn.Module) -> Iterator[nn.Module]:
        handle = self.merge_into(model)
        try:
            yield model
        finally:
            handle.unmerge()


@dataclass
class MergedLora:
    modules: dict[str, nn.Module]
    originals: dict[str, torch.Tensor]

    def unmerge(self) -> None:
        with torch.no_grad():
            for path, weight in self.originals.items():
                self.modules[path].weight.copy_(weight)
        self.originals.clear()


def read_config(directory: Path) -> dict[str, Any]:
    """The checked `adapter_config.json` of an adapter directory (see `parse_config`)."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise AdapterFormatError(f"{directory} has no {CONFIG_NAME}")
    return parse_config(path.read_bytes(), str(path))


def parse_config(data: bytes, where: str) -> dict[str, Any]:
    """A PEFT LoRA config from JSON bytes, refused with an `AdapterFormatError` naming `where`
    when it is not JSON (or nested too deeply to read), not a plain LoRA, or its r/alpha are not
    positive numbers."""
    try:
        config = json.loads(data)
    except RecursionError:
        raise AdapterFormatError(f"{where} is nested too deeply to be an adapter config") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer too long to read
        raise AdapterFormatError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"{where}: peft_type must be LORA")
    if config.get("use_dora"):
        raise AdapterFormatError(f"{where}: DoRA adapters are not supported")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise AdapterFormatError(f"{where}: per-module rank_pattern/alpha_pattern is not supported")
    if config.get("modules_to_save"):
        raise AdapterFormatError(f"{where}: modules_to_save cannot be represented as a LoRA")
    if "r" not in config:
        raise AdapterFormatError(f"{where}: missing 'r'")
    r, alpha = config["r"], config.get("lora_alpha", 1)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterFormatError(f"{where}: 'r' must be a positive integer, not {_what(r)}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterFormatError(f"{where}: 'lora_alpha' must be a finite number, not {_what(alpha)}")
    return config


def _what(value: Any) -> str:
    """A short description of a bad config value (never its whole, possibly huge, contents)."""
    if isinstance(value, (bool, int, float)) or value is None:
        return json.dumps(value)[:40]
    return f"a JSON {type(value).__name__.replace('dict', 'object').replace('list', 'array')}"


def resolve_modules(model: nn.Module, spec: LoraSpec) -> dict[str, nn.Module]:
    """The target modules of `spec` in `model`, by path, with their shapes checked."""
    found: dict[str, nn.Module] = {}
    for m in spec.modules:
        for layer in range(spec.num_layers):
            path = spec.module_path(layer, m.name)
            try:
                module = model.get_submodule(path)
            except AttributeError as exc:
                raise SpecError(f"the model has no module {path!r}") from exc
            w = module.weight
            shape = (m.in_features, m.out_features) if m.conv1d else (m.out_features, m.in_features)
            if tuple(w.shape) != shape:
                raise SpecError(f"{path}: weight {tuple(w.shape)} does not match the spec {shape}")
            found[path] = module
    return found
