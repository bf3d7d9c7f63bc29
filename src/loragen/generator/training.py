"""Training a `LearnedGenerator` on a registry: `train_generator` builds the model, its
normalisation statistics, safety ranges and description space from the registry's experts (minus
the holdout), then fits it on every checkpoint of those experts with each of their registry
descriptions as a condition."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..registry import Registry
from ..registry.index import normalised
from ..registry.multitask import load_multitask
from .config import CheckpointConfig, GeneratorConfig
from .cvae import LoraCVAE, TrainingSet, fit
from .decoder import TokenLayout
from .description_encoder import DescriptionEncoder, TuningConfig, fine_tune
from .description_head import DescriptionHead
from .errors import GenerationError
from .learned import LearnedGenerator
from .persistence import STATE_NAME
from .safety import Safety, calibrate_ood, norm_range
from .space import DescriptionSpace
from .task_vector import Example, TaskVectors
from .tokens import RegistryTokens


def default_condition(method: str, tokens: RegistryTokens) -> str:
    """icm's condition when none is set: the registry read (`memory`) where most experts have two
    descriptions or more, since it keeps a paraphrase's condition on the points the decoder was
    trained at; the embedding itself (`text`) where they have one each, since there the read only
    blurs neighbouring tasks together. sg reads text."""
    if method != "icm":
        return "text"
    counts = np.unique(tokens.descriptions()[2], return_counts=True)[1]
    return "memory" if np.median(counts) >= 2 else "text"


def settings(method: str | None = None, config: GeneratorConfig | None = None, **overrides: Any) -> GeneratorConfig:
    """`config` (default: `GeneratorConfig()`) with `method` and the named fields replaced; an
    unknown name is a TypeError, as an unknown keyword argument is."""
    unknown = sorted(set(overrides) - {f.name for f in fields(GeneratorConfig)})
    if unknown:
        raise TypeError(f"unknown generator settings: {', '.join(unknown)} (see GeneratorConfig)")
    if method is not None:
        overrides["method"] = method
    return replace(config or GeneratorConfig(), **overrides)


def train_generator(registry: Registry, method: str | None = None, *, config: GeneratorConfig | None = None,
                    out_dir: str | Path | None = None, resume: bool = False,
                    examples: Mapping[str, Sequence[Example]] | None = None, task_vectors: TaskVectors | None = None,
                    description_head: bool | DescriptionHead | None = None,
                    description_encoder: bool | DescriptionEncoder | None = None, progress: bool = False,
                    **overrides: Any) -> LearnedGenerator:
    """Train ICM-LoRA (`icm`) or SG-LoRA (`sg`) on every checkpoint of the registry's experts.

    The settings are `config` with `method` and any `GeneratorConfig` field named in `overrides`
    replaced (`train_generator(reg, "sg", epochs=5)`). The same settings train the same weights.

    icm with `examples` (expert name -> {input, output} pairs, e.g. its task's training instances)
    also learns from in-context task vectors, read by `task_vectors` (default: the registry's base
    model): `example_sets` random sets of `examples_per_set` per expert, dropped half of the time so
    that requests without examples still work.

    `description_encoder` and `description_head` set the settings of those names, or pass a trained
    generator's `encoder` and `head` to share them between generators of one registry and holdout.
    A residual generator (`residual=True`) is trained through the task loss
    (`training/generator_task.py`), so it takes `epochs=0`. With `out_dir` the generator is saved
    there, and `resume` continues the fit from the training state saved in it."""
    flags = {name: value if isinstance(value, bool) else True
             for name, value in (("description_head", description_head), ("description_encoder", description_encoder))
             if value is not None}
    cfg = settings(method, config, **flags, **overrides)
    layout = TokenLayout(registry.spec)
    tokens = RegistryTokens(registry, layout, set(cfg.holdout))
    cvae = cfg.cvae(cfg.condition_from or default_condition(cfg.method, tokens))
    tv = None
    if examples and cfg.method == "icm":
        source = task_vectors or TaskVectors(registry.spec)
        tv = expert_task_vectors(source, [e.name for e in tokens.experts], examples, cfg.example_sets,
                                 cfg.examples_per_set, cfg.seed)
    tv_dim = tv.shape[-1] - 1 if tv is not None else 0
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = LoraCVAE(layout, cvae, registry.dim + (tv_dim + 1 if tv_dim else 0))
    model.set_stats(*tokens.stats())
    ranged = [c for cps in tokens.raw for c in cps]
    if cfg.residual:
        multitask = load_multitask(registry)
        model.set_residual([g[0] for g in layout.to_groups({m: b[None] for m, b in multitask.B.items()})])
        ranged.append(multitask.B)
    lo, hi = norm_range(ranged)
    # The description space learns from the generator's own experts' descriptions only.
    texts, vecs, owners = tokens.descriptions()
    encoder = description_encoder if isinstance(description_encoder, DescriptionEncoder) else None
    if encoder is None and cfg.description_encoder:
        weights = fine_tune(registry.encoder, texts, owners, seed=cfg.seed, progress=progress)
        encoder = DescriptionEncoder(registry.encoder, weights, TuningConfig()) if weights is not None else None
    if encoder is not None:
        vecs = normalised(encoder.encode(texts))
    head = description_head if isinstance(description_head, DescriptionHead) else None
    if head is None and cfg.description_head:
        head = DescriptionHead.fit(vecs, owners, seed=cfg.seed)
    space = DescriptionSpace(registry, tokens, top_k=cvae.top_k, temperature=cvae.temperature, head=head,
                             encoder=encoder, encoded=(texts, vecs, owners))
    ood = calibrate_ood(*space.described[:2])  # in the generator's own space
    config_out = CheckpointConfig(
        generator=cfg, cvae=cvae, spec=registry.spec.to_dict(), basis_sha256=registry.basis.sha256(),
        embedding_model=registry.encoder.model_id, embedding_dim=registry.dim,
        registry_fingerprint=registry.fingerprint(), task_vector_dim=tv_dim, ood_threshold=ood,
        description_head=head.config if head is not None else None,
        description_encoder=encoder.config if encoder is not None else None)
    gen = LearnedGenerator(registry, model, Safety(lo, hi, ood), config_out, space=space)
    data = training_set(gen, tokens, cfg.self_share())
    model.set_text_stats(data.text)
    data.task_vectors = tv
    state_path = Path(out_dir) / STATE_NAME if out_dir is not None else None
    if state_path is not None:
        state_path.parent.mkdir(parents=True, exist_ok=True)
    # epochs=0: the initial model, for a generator trained only through the task loss
    config_out.training = (fit(model, data, cfg.fit(), state_path=state_path, resume=resume) if cfg.epochs > 0
                           else {"epochs": 0})
    if out_dir is not None:
        gen.save_pretrained(out_dir)
    return gen


def training_set(gen: LearnedGenerator, tokens: RegistryTokens, self_fraction: float = 0.0) -> TrainingSet:
    """Normalised checkpoints, and every description of every expert as a condition; for SG the
    condition is leave-one-out: built from the expert's top-K neighbours other than itself (and,
    with `self_fraction`, also the inclusive condition, drawn that often in training)."""
    query = gen.space.described[0].numpy()
    owners = tokens.descriptions()[2]
    index = {eid: i for i, eid in enumerate(tokens.ids)}
    x, owner = tokens.tokens(gen.stats)
    text = torch.from_numpy(query)
    if gen.reads_memory:
        text = gen.memory_weights(text) @ gen.space.memory_keys
    data = TrainingSet(x, owner, text, torch.tensor([index[o] for o in owners.tolist()]))
    if gen.method == "sg":
        hits = gen.search(query, own=owners.tolist())
        _, data.mu_star, data.sigma_star, _ = gen.conditions(query, hits)
        if self_fraction > 0:
            _, data.mu_self, data.sigma_self, _ = gen.conditions(query, gen.search(query))
            data.self_fraction = self_fraction
    return data


def expert_task_vectors(source: TaskVectors, experts: list[str], examples: Mapping[str, Sequence[Example]],
                        sets: int, per_set: int, seed: int) -> torch.Tensor:
    """(E, sets, dim + 1): random example sets per expert; all zeros for experts without examples."""
    rng = random.Random(seed)
    chosen = {name: [rng.sample(list(examples[name]), min(per_set, len(examples[name]))) for _ in range(sets)]
              for name in experts if examples.get(name)}
    if not chosen:
        raise GenerationError("none of the registry's experts has examples to build task vectors from")
    vecs = source.vectors([s for name in chosen for s in chosen[name]])
    out = torch.zeros(len(experts), sets, vecs.shape[1] + 1)
    rows = [i for i, name in enumerate(experts) if name in chosen]
    out[rows, :, :-1] = vecs.view(len(rows), sets, -1)
    out[rows, :, -1] = 1.0
    return out
