"""Training a `LearnedGenerator`: `train_generator` builds the model, its normalisation statistics,
safety ranges and description head from the registry, then fits it on every checkpoint of every
expert (minus `holdout`) with each registry description as a condition."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..registry import Registry
from ..registry.index import normalised
from ..registry.multitask import load_multitask
from .cvae import CVAEConfig, FitConfig, LoraCVAE, TrainingSet, fit
from .decoder import TokenLayout
from .description_encoder import DescriptionEncoder, TuningConfig, fine_tune
from .description_head import DescriptionHead
from .errors import GenerationError
from .learned import FORMAT, STATE_NAME, LearnedGenerator, RegistryTokens, registry_descriptions
from .safety import Safety, calibrate_ood, norm_range
from .task_vector import Example, TaskVectors

KL_DEFAULTS = {"icm": 0.005, "sg": 1.0}
# GSNN term (decode from a prior z, as at inference): icm needs it to read its condition at all;
# sg's strong KL (1.0) already ties its posterior to the conditional prior.
PRIOR_WEIGHT_DEFAULTS = {"icm": 1.0, "sg": 0.0}
SELF_FRACTION = 0.5  # sg: share of training conditions with the expert itself retrievable


# icm's condition by default: read through the registry (Σ α_k · expert key) when most experts have
# several descriptions, which keeps a paraphrase's condition on the points the decoder was trained at
# (demo dev set 0.51 vs 0.21); the embedding itself when they have one each, where the read only
# blurs neighbouring tasks together (cls-tasks: train-task gain 87 % vs 92 %).
def default_condition(method: str, registry: Registry, tokens: RegistryTokens) -> str:
    if method != "icm":
        return "text"
    owners = registry_descriptions(registry, tokens)[2]
    counts = np.unique(owners, return_counts=True)[1]
    return "memory" if np.median(counts) >= 2 else "text"


def train_generator(registry: Registry, method: str, *, epochs: int = 60, lr: float = 3e-3, batch: int = 8,
                    latent: int = 256, kl_weight: float | None = None, seed: int = 0, val_fraction: float = 0.1,
                    patience: int = 15, out_dir: str | Path | None = None, resume: bool = False,
                    holdout: list[str] | tuple[str, ...] = (), hidden: int = 512, top_k: int = 4,
                    temperature: float = 0.05, examples: Mapping[str, Sequence[Example]] | None = None,
                    example_sets: int = 8, examples_per_set: int = 4,
                    task_vectors: TaskVectors | None = None, self_fraction: float | None = None,
                    prior_weight: float | None = None, description_head: bool | DescriptionHead = True,
                    condition_from: str | None = None, description_encoder: bool | DescriptionEncoder = True,
                    residual: bool = False, progress: bool = False) -> LearnedGenerator:
    """Train ICM-LoRA (`icm`) or SG-LoRA (`sg`) on every checkpoint of the registry's experts.

    icm with `examples` (expert name -> {input, output} pairs, e.g. its task's training instances)
    also learns from in-context task vectors: `example_sets` random sets of `examples_per_set`
    per expert, dropped half of the time so that requests without examples still work.

    `description_encoder` fine-tunes the text encoder's top layers on the registry's paraphrases
    (`description_encoder.py`); `description_head` learns a linear map of the (tuned) encoder's
    embeddings from them (`description_head.py`). Both on: best on the demo world's new paraphrases
    (RESULTS.md). Pass a trained generator's `encoder` and `head` to share them between generators of
    one registry and holdout.
    `prior_weight` is the GSNN term of the hybrid CVAE loss; sg draws `self_fraction` of its
    training conditions with the expert itself retrievable (the rest leave-one-out).
    icm's `condition_from="memory"` (the default where most experts have two or more descriptions)
    conditions on Σ α_k key_k over the top-K experts (key = an expert's mean description in the
    generator's space, α = softmax(sim / temperature)), trained with each description's own registry
    entry left out unless that makes it read as another expert. `None` takes the per-method defaults
    above.
    `residual` decodes on top of the registry's multi-task LoRA (`CVAEConfig.residual`); such a
    generator is trained through the task loss (`training/generator_task.py`), so pass `epochs=0`."""
    if method not in KL_DEFAULTS:
        raise GenerationError(f"unknown learned method {method!r}; choose icm or sg")
    if condition_from not in (None, "text", "memory") or (method == "sg" and condition_from == "memory"):
        raise GenerationError(f"condition_from {condition_from!r}: icm reads text or memory, sg reads text")
    cvae = CVAEConfig(method=method, latent=latent, hidden=hidden, top_k=top_k, temperature=temperature,
                      prior_weight=PRIOR_WEIGHT_DEFAULTS[method] if prior_weight is None else prior_weight,
                      kl_weight=KL_DEFAULTS[method] if kl_weight is None else kl_weight, residual=residual)
    if residual and epochs > 0:
        raise GenerationError("a generator residual over the multi-task LoRA is trained on the task loss only "
                              "(objective 'task'); reconstruction targets do not include the offset")
    layout = TokenLayout(registry.spec)
    tokens = RegistryTokens(registry, layout, set(holdout))
    cvae.condition_from = condition_from or default_condition(method, registry, tokens)
    tv = None
    if examples and method == "icm":
        source = task_vectors or TaskVectors(registry.spec)
        tv = expert_task_vectors(source, [e.name for e in tokens.experts], examples, example_sets,
                                 examples_per_set, seed)
    tv_dim = tv.shape[-1] - 1 if tv is not None else 0
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LoraCVAE(layout, cvae, registry.dim + (tv_dim + 1 if tv_dim else 0))
    model.set_stats(*tokens.stats())
    ranged = [c for cps in tokens.raw for c in cps]
    if residual:
        multitask = load_multitask(registry)
        model.set_residual([g[0] for g in layout.to_groups({m: b[None] for m, b in multitask.B.items()})])
        ranged.append(multitask.B)
    lo, hi = norm_range(ranged)
    safety = Safety(lo, hi, -1.0)  # OOD threshold: calibrated below, in the generator's space
    config = {"format": FORMAT, "version": 1, "method": method, "cvae": asdict(cvae), "spec": registry.spec.to_dict(),
              "basis_sha256": registry.basis.sha256(), "embedding_model": registry.encoder.model_id,
              "embedding_dim": registry.dim, "registry_fingerprint": registry.fingerprint(),
              "holdout": sorted(holdout), "task_vector_dim": tv_dim}
    # Trained on the descriptions of the generator's own experts only (held-out ones never).
    texts, vecs, owners = registry_descriptions(registry, tokens)
    encoder = description_encoder if isinstance(description_encoder, DescriptionEncoder) else None
    if description_encoder is True:
        weights = fine_tune(registry.encoder, texts, owners, seed=seed, progress=progress)
        encoder = DescriptionEncoder(registry.encoder, weights, TuningConfig()) if weights is not None else None
    if encoder is not None:
        vecs = normalised(encoder.encode(texts))
    head = description_head if isinstance(description_head, DescriptionHead) else None
    if description_head is True:
        head = DescriptionHead.fit(vecs, owners, seed=seed)
    config["description_head"] = head.to_dict() if head is not None else None
    config["description_encoder"] = encoder.to_dict() if encoder is not None else None
    gen = LearnedGenerator(registry, model, safety, config, head=head, encoder=encoder)
    gen.__dict__["_tokens"] = tokens
    gen.__dict__["_described"] = gen.described(texts, vecs, owners)  # the (tuned) encoding done above
    safety.ood_threshold = config["ood_threshold"] = calibrate_ood(*gen._described[:2])
    data = training_set(gen, tokens, SELF_FRACTION if self_fraction is None else self_fraction)
    model.set_text_stats(data.text)
    data.task_vectors = tv
    state_path = Path(out_dir) / STATE_NAME if out_dir is not None else None
    if state_path is not None:
        state_path.parent.mkdir(parents=True, exist_ok=True)
    fit_config = FitConfig(epochs=epochs, lr=lr, batch=batch, seed=seed, val_fraction=val_fraction, patience=patience)
    # epochs=0: the initial model, for a generator trained only through the task loss
    gen.config["training"] = (fit(model, data, fit_config, state_path=state_path, resume=resume) if epochs > 0
                              else {"epochs": 0})
    if out_dir is not None:
        gen.save_pretrained(out_dir)
    return gen


def training_set(gen: LearnedGenerator, tokens: RegistryTokens, self_fraction: float = 0.0) -> TrainingSet:
    """Normalised checkpoints, and every description of every expert as a condition; for SG the
    condition is leave-one-out: built from the expert's top-K neighbours other than itself (and,
    with `self_fraction`, also the inclusive condition, drawn that often in training)."""
    query = gen._described[0].numpy()
    owners = registry_descriptions(gen.registry, tokens)[2]
    index = {eid: i for i, eid in enumerate(tokens.ids)}
    x, owner = tokens.tokens(gen.stats)  # type: ignore[arg-type]
    text = torch.from_numpy(query)
    if gen.reads_memory:
        text = gen.memory_weights(text) @ gen._memory_keys
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
