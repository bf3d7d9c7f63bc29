"""A LoRA's shape for a base model, derived from its transformers config alone.

The model is instantiated on the `meta` device (no weights, no memory), and the spec reads the
target modules' names and shapes from it, so names are exactly the ones PEFT wraps.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LoragenError

ENCODER_MODEL_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra"}
_LAYERED = re.compile(r"^(?P<prefix>.*?)\.(?P<layer>\d+)\.(?P<rel>.+)$")


class SpecError(LoragenError, ValueError):
    """A config, adapter or tensor does not fit a LoRA spec."""


@dataclass(frozen=True)
class ModuleSpec:
    """One module type inside every layer, e.g. `self_attn.q_proj`."""

    name: str
    in_features: int
    out_features: int
    conv1d: bool = False  # GPT-2 style weight stored as (in, out)


@dataclass(frozen=True)
class LoraSpec:
    base_model: str
    layer_prefix: str
    num_layers: int
    modules: tuple[ModuleSpec, ...]
    rank: int
    alpha: float
    use_rslora: bool = False
    task_type: str = "CAUSAL_LM"
    # True when short names would also match modules outside the layers (BERT's pooler.dense).
    exact_targets: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def module_names(self) -> list[str]:
        return [m.name for m in self.modules]

    @property
    def fan_in_fan_out(self) -> bool:
        return any(m.conv1d for m in self.modules)

    @property
    def target_modules(self) -> list[str] | str:
        """Short names when they are unambiguous (what PEFT/vLLM users expect), else a regex
        that PEFT full-matches against module paths."""
        short = [m.name.rsplit(".", 1)[-1] for m in self.modules]
        if not self.exact_targets and len(set(short)) == len(short):
            return short
        names = "|".join(re.escape(n) for n in self.module_names)
        return rf"{re.escape(self.layer_prefix)}\.\d+\.({names})"

    def module(self, name: str) -> ModuleSpec:
        for m in self.modules:
            if m.name == name:
                return m
        raise SpecError(f"module {name!r} is not in the spec ({', '.join(self.module_names)})")

    def module_path(self, layer: int, name: str) -> str:
        return f"{self.layer_prefix}.{layer}.{name}"

    def with_rank(self, rank: int, alpha: float | None = None) -> LoraSpec:
        return replace(self, rank=rank, alpha=float(rank if alpha is None else alpha))

    def with_base_model(self, base_model: str) -> LoraSpec:
        return replace(self, base_model=base_model)

    def shape_key(self) -> tuple[Any, ...]:
        """Everything that must agree for two specs' tensors to be interchangeable."""
        return (self.layer_prefix, self.num_layers, self.modules)

    def check_compatible(self, other: LoraSpec, what: str = "adapter", *, allow_subset: bool = False) -> list[str]:
        """Refuse `other` unless its tensors fit this spec's: the same layer stack, and each of its
        modules present here by name with the same shape (the order of modules never matters).

        Returns this spec's modules that `other` lacks, in this spec's order; unless
        `allow_subset`, lacking any is refused too. Raises `SpecError` naming what differs.
        """
        if (other.layer_prefix, other.num_layers) != (self.layer_prefix, self.num_layers):
            raise SpecError(
                f"{what} does not match the base model: it has {other.num_layers} layers under "
                f"{other.layer_prefix!r}; expected {self.num_layers} layers under {self.layer_prefix!r}"
            )
        mine = {m.name: m for m in self.modules}
        theirs = {m.name: m for m in other.modules}
        unknown = [n for n in theirs if n not in mine]
        if unknown:
            raise SpecError(
                f"{what} does not match the base model: it targets {', '.join(unknown)}, not among "
                f"the modules here ({', '.join(mine)})"
            )
        wrong = [f"{n} is {_shape(theirs[n])}, expected {_shape(m)}"
                 for n, m in mine.items() if n in theirs and theirs[n] != m]
        if wrong:
            raise SpecError(f"{what} does not match the base model: {'; '.join(wrong)}")
        absent = [n for n in mine if n not in theirs]
        if absent and not allow_subset:
            raise SpecError(f"{what} does not match the base model: it lacks {', '.join(absent)}")
        return absent

    def fingerprint(self) -> str:
        blob = json.dumps([self.layer_prefix, self.num_layers, [asdict(m) for m in self.modules]])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["modules"] = [asdict(m) for m in self.modules]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraSpec:
        d = dict(d)
        d["modules"] = tuple(ModuleSpec(**m) for m in d["modules"])
        return cls(**d)


def _shape(m: ModuleSpec) -> str:
    kind = ", Conv1D" if m.conv1d else ""
    return f"({m.in_features} -> {m.out_features}{kind})"


def load_config(config: Any) -> Any:
    """A transformers config from a config object, a dict with `model_type`, or a local path."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    if isinstance(config, dict):
        d = dict(config)
        model_type = d.pop("model_type", None)
        if not model_type:
            raise SpecError("a config dict needs a 'model_type' (e.g. 'llama')")
        return AutoConfig.for_model(model_type, **d)
    path = Path(config)
    if not path.exists():
        raise SpecError(f"no model config at {path}")
    return AutoConfig.from_pretrained(path)


def default_task_type(config: Any) -> str:
    return "FEATURE_EXTRACTION" if config.model_type in ENCODER_MODEL_TYPES else "CAUSAL_LM"


def meta_model(config: Any, task_type: str) -> nn.Module:
    """The model's module tree on the meta device: names and shapes, no weights."""
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if task_type == "CAUSAL_LM" else AutoModel
    with torch.device("meta"):
        return auto.from_config(config)


def default_targets(model_type: str) -> list[str]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if not targets:
        raise SpecError(f"no default LoRA targets for model type {model_type!r}; pass targets")
    return list(targets)


def spec_from_config(
    config: Any,
    *,
    targets: list[str] | None = None,
    rank: int = 8,
    alpha: float | None = None,
    use_rslora: bool = False,
    base_model: str | None = None,
    task_type: str | None = None,
) -> LoraSpec:
    """Derive the spec of a LoRA on `targets` for the model that `config` describes."""
    from transformers.pytorch_utils import Conv1D

    cfg = load_config(config)
    task_type = task_type or default_task_type(cfg)
    targets = targets or default_targets(cfg.model_type)
    model = meta_model(cfg, task_type)
    prefix: str | None = None
    outside_layers = False
    found: dict[str, dict[int, ModuleSpec]] = {}
    for name, module in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(module, nn.Linear):
            ms = ModuleSpec("", module.in_features, module.out_features)
        elif isinstance(module, Conv1D):
            ms = ModuleSpec("", module.weight.shape[0], module.weight.shape[1], conv1d=True)
        else:
            continue
        match = _LAYERED.match(name)
        if match is None:  # e.g. BERT's pooler.dense: not part of the layer stack
            outside_layers = True
            continue
        if prefix not in (None, match["prefix"]):
            raise SpecError(f"targets span two layer stacks: {prefix!r} and {match['prefix']!r}")
        prefix = match["prefix"]
        found.setdefault(match["rel"], {})[int(match["layer"])] = replace(ms, name=match["rel"])
    if prefix is None:
        raise SpecError(f"none of the targets {targets} is a linear layer of this model")
    num_layers = 1 + max(max(by_layer) for by_layer in found.values())
    modules = []
    for rel, by_layer in found.items():
        shapes = set(by_layer.values())
        if len(by_layer) != num_layers or len(shapes) != 1:
            raise SpecError(f"module {rel!r} is not present with one shape in every layer")
        modules.append(shapes.pop())
    if len({m.conv1d for m in modules}) > 1:
        raise SpecError("mixing Conv1D and Linear targets cannot be written as one PEFT adapter")
    name = base_model or getattr(cfg, "name_or_path", "") or cfg.model_type
    return LoraSpec(
        base_model=str(name),
        layer_prefix=prefix,
        num_layers=num_layers,
        modules=tuple(modules),
        rank=rank,
        alpha=float(rank if alpha is None else alpha),
        use_rslora=use_rslora,
        task_type=task_type,
        exact_targets=outside_layers,
    )


def _target_order(targets: Any) -> Callable[[str], tuple[int, str]]:
    """A sort key putting modules in the order the config's `target_modules` names them (how
    loragen writes its spec's order), then by name: the same spec whatever order the tensors came in."""

    def key(rel: str) -> tuple[int, str]:
        if isinstance(targets, list):
            for i, t in enumerate(targets):
                if isinstance(t, str) and (rel == t or rel.endswith("." + t)):
                    return i, rel
        elif isinstance(targets, str) and (pos := targets.find(re.escape(rel))) >= 0:
            return pos, rel
        return sys.maxsize, rel

    return key


def spec_from_state_dict(
    tensors: dict[str, torch.Tensor], config: dict[str, Any]
) -> tuple[LoraSpec, dict[str, torch.Tensor]]:
    """Rebuild the spec of a PEFT adapter from its keys and config; return stacked factors.

    The returned dict maps `A:<module>` to (L, r, in) and `B:<module>` to (L, out, r).
    """
    pairs: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    prefix: str | None = None
    key_re = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
    for key, value in tensors.items():
        km = key_re.match(key)
        if km is None:
            raise SpecError(f"unexpected tensor {key!r}: only lora_A/lora_B weights are supported")
        lm = _LAYERED.match(km["path"])
        if lm is None:
            raise SpecError(f"tensor {key!r} is not inside a numbered layer")
        if prefix not in (None, lm["prefix"]):
            raise SpecError(f"adapter spans two layer stacks: {prefix!r} and {lm['prefix']!r}")
        prefix = lm["prefix"]
        pairs.setdefault((lm["rel"], int(lm["layer"])), {})[km["ab"]] = value
    if prefix is None:
        raise SpecError("the adapter holds no LoRA tensors")
    rank = int(config["r"])
    conv1d = bool(config.get("fan_in_fan_out", False))
    rels = sorted(dict.fromkeys(rel for rel, _ in pairs), key=_target_order(config.get("target_modules")))
    num_layers = 1 + max(layer for _, layer in pairs)
    modules, stacked = [], {}
    for rel in rels:
        a_list, b_list = [], []
        for layer in range(num_layers):
            ab = pairs.get((rel, layer), {})
            if set(ab) != {"A", "B"}:
                raise SpecError(f"module {rel!r} lacks lora_A or lora_B in layer {layer}")
            a, b = ab["A"], ab["B"]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
                raise SpecError(
                    f"{rel} layer {layer}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} "
                    f"do not have rank r={rank}"
                )
            a_list.append(a)
            b_list.append(b)
        shapes = {(tuple(a.shape), tuple(b.shape)) for a, b in zip(a_list, b_list)}
        if len(shapes) != 1:
            raise SpecError(f"module {rel!r} has different shapes across layers")
        stacked[f"A:{rel}"] = torch.stack(a_list)
        stacked[f"B:{rel}"] = torch.stack(b_list)
        modules.append(ModuleSpec(rel, a_list[0].shape[1], b_list[0].shape[0], conv1d=conv1d))
    spec = LoraSpec(
        base_model=str(config.get("base_model_name_or_path") or ""),
        layer_prefix=prefix,
        num_layers=num_layers,
        modules=tuple(modules),
        rank=rank,
        alpha=float(config.get("lora_alpha", rank)),
        use_rslora=bool(config.get("use_rslora", False)),
        task_type=str(config.get("task_type") or "CAUSAL_LM"),
        exact_targets=isinstance(config.get("target_modules"), str),
    )
    return spec, stacked
