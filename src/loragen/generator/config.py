"""The learned generator's configuration: what to train (`GeneratorConfig`) and what a checkpoint's
`config.json` records (`CheckpointConfig`).

`GeneratorConfig` is the one typed set of settings `train_generator` reads; its fields carry their
help. `CheckpointConfig` adds what training built and found: the CVAE's resolved configuration, the
registry the generator was trained for (spec, basis, text encoder), the OOD threshold, the
description head's and encoder's settings, and the training records. `CheckpointConfig.from_json`
reads both the current layout (`version` 2, the settings under `"generator"`) and the flat layout
of version 1, so checkpoints written before the settings were typed keep loading.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..adapters import LoraSpec
from ..registry import Registry
from .cvae import CVAEConfig, FitConfig
from .description_encoder import TuningConfig
from .description_head import HeadConfig
from .errors import GenerationError

log = logging.getLogger(__name__)
FORMAT = "loragen-generator"
VERSION = 2
METHODS = ("icm", "sg")
CONDITIONS = ("text", "memory")
# Per-method defaults of the settings left None. icm needs the decode-from-the-prior (GSNN) term to
# read its condition at all; sg's strong KL already ties its posterior to the conditional prior.
KL_DEFAULTS = {"icm": 0.005, "sg": 1.0}
PRIOR_WEIGHT_DEFAULTS = {"icm": 1.0, "sg": 0.0}
SELF_FRACTION = 0.5


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class GeneratorConfig:
    """How a learned generator (ICM-LoRA or SG-LoRA) is built and trained on a registry.

    Contract: a config that constructs is valid (`method`, `condition_from` and the residual's
    `epochs=0` are checked here); the settings left None take their per-method default when the
    generator is trained (`kl()`, `prior()`, `self_share()`; `condition_from` from the registry's
    descriptions). The same config and seed train the same weights. It is saved under
    `"generator"` in the checkpoint's `config.json`.
    """

    method: str = field(default="icm", metadata=_help("icm (ICM-LoRA) or sg (SG-LoRA)."))
    holdout: list[str] = field(default_factory=list, metadata=_help(
        "Experts (by name) the generator never trains on nor conditions on: their tasks stay unseen."))
    latent: int = field(default=256, metadata=_help("Width of the CVAE's latent z."))
    hidden: int = field(default=512, metadata=_help("Width of the CVAE's hidden layers."))
    top_k: int = field(default=4, metadata=_help("Neighbour experts read per description."))
    temperature: float = field(default=0.05, metadata=_help(
        "Softmax temperature of the neighbour weights α = softmax(similarity / temperature)."))
    kl_weight: float | None = field(default=None, metadata=_help(
        "Weight of the KL term; None: icm 0.005, sg 1.0."))
    prior_weight: float | None = field(default=None, metadata=_help(
        "Weight of the decode-from-the-prior (GSNN) term of the hybrid CVAE loss; None: icm 1.0, sg 0."))
    condition_from: str | None = field(default=None, metadata=_help(
        "icm: condition on the description's 'text' embedding or on its 'memory' read of the registry "
        "(Σ α_k · expert key over the top-K experts). None: memory where most experts have two "
        "descriptions or more, else text. sg reads text."))
    self_fraction: float | None = field(default=None, metadata=_help(
        "sg: share of training conditions built with the expert itself retrievable (the rest "
        "leave-one-out); None: 0.5."))
    residual: bool = field(default=False, metadata=_help(
        "Decode on top of the registry's multi-task LoRA; trained through the task loss only, so "
        "it needs epochs=0."))
    description_encoder: bool = field(default=True, metadata=_help(
        "Fine-tune the text encoder's top layers on the registry's paraphrases (BERT encoders)."))
    description_head: bool = field(default=True, metadata=_help(
        "Learn a linear map of the (tuned) encoder's embeddings from the registry's paraphrases."))
    example_sets: int = field(default=8, metadata=_help(
        "icm with examples: random example sets drawn per expert for its task vectors."))
    examples_per_set: int = field(default=4, metadata=_help("icm with examples: pairs in each set."))
    epochs: int = field(default=60, metadata=_help(
        "Reconstruction epochs; 0 keeps the initial model (a generator trained by the task loss)."))
    lr: float = field(default=3e-3, metadata=_help("Learning rate of the reconstruction fit."))
    batch: int = field(default=8, metadata=_help("Checkpoints per step of the reconstruction fit."))
    seed: int = field(default=0, metadata=_help(
        "Seeds the model's initial weights, the fit, the encoder's and the head's training."))
    val_fraction: float = field(default=0.1, metadata=_help("Share of checkpoints kept for validation."))
    patience: int = field(default=15, metadata=_help("Epochs without improvement before stopping early."))

    def __post_init__(self) -> None:
        self.holdout = sorted(self.holdout)
        if self.method not in METHODS:
            raise GenerationError(f"unknown learned method {self.method!r}; choose icm or sg")
        if self.condition_from not in (None, *CONDITIONS) or (self.method == "sg" and self.condition_from == "memory"):
            raise GenerationError(f"condition_from {self.condition_from!r}: icm reads text or memory, sg reads text")
        if self.residual and self.epochs > 0:
            raise GenerationError("a generator residual over the multi-task LoRA is trained on the task loss only "
                                  "(objective 'task'); reconstruction targets do not include the offset")

    def kl(self) -> float:
        return KL_DEFAULTS[self.method] if self.kl_weight is None else self.kl_weight

    def prior(self) -> float:
        return PRIOR_WEIGHT_DEFAULTS[self.method] if self.prior_weight is None else self.prior_weight

    def self_share(self) -> float:
        return SELF_FRACTION if self.self_fraction is None else self.self_fraction

    def cvae(self, condition_from: str) -> CVAEConfig:
        """The CVAE's configuration, with `condition_from` resolved."""
        return CVAEConfig(method=self.method, latent=self.latent, hidden=self.hidden, top_k=self.top_k,
                          temperature=self.temperature, prior_weight=self.prior(), kl_weight=self.kl(),
                          residual=self.residual, condition_from=condition_from)

    def fit(self) -> FitConfig:
        return FitConfig(epochs=self.epochs, lr=self.lr, batch=self.batch, seed=self.seed,
                         val_fraction=self.val_fraction, patience=self.patience)


@dataclass
class CheckpointConfig:
    """What a generator checkpoint's `config.json` holds: its settings, the CVAE built from them, the
    registry state it was trained for (checked on load), and what training found and recorded."""

    generator: GeneratorConfig
    cvae: CVAEConfig
    spec: dict[str, Any]  # `LoraSpec.to_dict()` of the registry's adapters
    basis_sha256: str
    embedding_model: str
    embedding_dim: int
    registry_fingerprint: str | None = None
    task_vector_dim: int = 0  # 0: trained without in-context examples
    ood_threshold: float = -1.0
    description_head: HeadConfig | None = None  # None: no learned head
    description_encoder: TuningConfig | None = None  # None: the registry's encoder as it is
    training: dict[str, Any] = field(default_factory=dict)  # the reconstruction fit's record
    objective: str | None = None  # set by task-loss training (`training/generator_task.py`)
    task_training: dict[str, Any] | None = None

    @property
    def method(self) -> str:
        return self.generator.method

    @property
    def condition_dim(self) -> int:
        """Width of the decoder's condition: the description embedding, then any task vector and its flag."""
        return self.embedding_dim + (self.task_vector_dim + 1 if self.task_vector_dim else 0)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT, "version": VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = asdict(value) if hasattr(value, "__dataclass_fields__") else value
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "config.json") -> CheckpointConfig:
        """Either layout: version 2 (`"generator"` section) or the flat version 1."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise GenerationError(f"{where} is not a {FORMAT} config")
        try:
            cvae = CVAEConfig(**data["cvae"])
            generator = (GeneratorConfig(**data["generator"]) if "generator" in data
                         else _settings_from_v1(data, cvae))
            head, encoder = data.get("description_head"), data.get("description_encoder")
            return cls(generator=generator, cvae=cvae, spec=data["spec"], basis_sha256=data["basis_sha256"],
                       embedding_model=data["embedding_model"], embedding_dim=int(data["embedding_dim"]),
                       registry_fingerprint=data.get("registry_fingerprint"),
                       task_vector_dim=int(data.get("task_vector_dim", 0)),
                       ood_threshold=float(data.get("ood_threshold", -1.0)),
                       description_head=HeadConfig(**head) if head is not None else None,
                       description_encoder=TuningConfig(**encoder) if encoder is not None else None,
                       training=data.get("training", {}), objective=data.get("objective"),
                       task_training=data.get("task_training"))
        except (KeyError, TypeError, ValueError) as exc:
            raise GenerationError(f"{where} is not a valid {FORMAT} config: {exc!r}") from exc

    def check_compatible(self, registry: Registry, where: str) -> None:
        """Raise unless the generator can run on `registry`: same base model shape and rank, basis and
        text encoder. A registry whose experts changed since is only warned about."""
        spec = LoraSpec.from_dict(self.spec)
        mine = registry.spec
        if spec.shape_key() != mine.shape_key() or spec.rank != mine.rank:
            raise GenerationError(f"generator {where} was trained for another base model or rank (spec "
                                  f"{spec.fingerprint()} r={spec.rank}, registry {mine.fingerprint()} r={mine.rank})")
        if self.basis_sha256 != registry.basis.sha256():
            raise GenerationError(f"generator {where} was trained on another basis; retrain it on this registry")
        if self.embedding_model != registry.encoder.model_id:
            raise GenerationError(f"generator {where} uses embeddings of {self.embedding_model}, "
                                  f"the registry {registry.encoder.model_id}")
        if self.registry_fingerprint != registry.fingerprint():
            log.warning("generator %s was trained on a different state of the registry", where)


def _settings_from_v1(data: dict[str, Any], cvae: CVAEConfig) -> GeneratorConfig:
    """Version 1 kept no settings section: rebuild it from the CVAE config and the fit's record."""
    fit = {k: v for k, v in data.get("training", {}).get("fit", {}).items()
           if k in {"epochs", "lr", "batch", "seed", "val_fraction", "patience"}}
    if cvae.residual:
        fit["epochs"] = 0
    return GeneratorConfig(method=data.get("method", cvae.method), holdout=list(data.get("holdout", [])),
                           latent=cvae.latent, hidden=cvae.hidden, top_k=cvae.top_k, temperature=cvae.temperature,
                           kl_weight=cvae.kl_weight, prior_weight=cvae.prior_weight,
                           condition_from=cvae.condition_from, residual=cvae.residual,
                           description_encoder=data.get("description_encoder") is not None,
                           description_head=data.get("description_head") is not None, **fit)


def saved_method(data: Any) -> str | None:
    """The method a `config.json` (either layout) names, or None."""
    if not isinstance(data, dict):
        return None
    section = data.get("generator")
    return (section if isinstance(section, dict) else data).get("method")
