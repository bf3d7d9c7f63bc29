"""`LearnedGenerator`: ICM-LoRA or SG-LoRA trained on a registry, behind `generate(descriptions)`.

One model per registry, trained on every checkpoint of every expert but its holdout
(`tokens.py`). A request is read in the generator's description space (`space.py`); this module
turns the neighbours found there into the decoder's condition and decodes every request and sample
in one fused pass. `training.py` trains a generator, `persistence.py` saves and loads one, and
`config.py` types its settings.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import einsum, repeat

from ..adapters import Lora, LoraStack
from ..registry import Expert, Hit, Registry
from . import persistence
from .compiled_decode import CompiledDecode, Decode
from .config import CheckpointConfig
from .cvae import LoraCVAE, denormalise
from .description_encoder import DescriptionEncoder
from .description_head import DescriptionHead
from .errors import GenerationError
from .example_evidence import (EXAMPLE_CANDIDATES, Evidence, applies, candidates, example_logprobs, examples_metadata,
                               reweigh)
from .inline_examples import with_inline_examples
from .retrieval import Neighbour, ambiguous, check_descriptions
from .safety import Safety
from .space import DescriptionSpace, KnownVectors
from .task_vector import Example, TaskVectors, check_examples
from .tokens import RegistryTokens, Stats

SIGMA_FLOOR = 1e-4  # added to σ*² (normalised space) so log σ* and the residual scale stay finite
# Past this many experts per neighbour, sg's prior mixes each row's gathered top-k prototypes
# instead of reading all E: a dense product over a few experts is faster than the gather, while
# over a large registry it reads mostly zero weights.
GATHER_EXPERTS_PER_K = 8


def mix(weights: torch.Tensor, mean: list[torch.Tensor], second: list[torch.Tensor],
        k: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """μ* = Σ α μ_k, σ*² = Σ α σ_k² + Σ α (μ_k − μ*)² = Σ α (σ_k² + μ_k²) − μ*²; returns (μ*, σ*).

    `weights` (N, E) has at most `k` non-zeros a row. Past GATHER_EXPERTS_PER_K · k experts each row
    mixes its own k gathered prototypes instead of reading all E (the rule ignores N, so a batch
    equals single calls)."""
    if 0 < k and weights.shape[1] > GATHER_EXPERTS_PER_K * k:
        w, idx = weights.topk(k, dim=1)
        combine = lambda t: einsum(w, t[idx], "n k, n k t w -> n t w")  # noqa: E731
    else:
        combine = lambda t: einsum(weights, t, "n e, e t w -> n t w")  # noqa: E731
    mu = [combine(m) for m in mean]
    var = [combine(s) - u * u for s, u in zip(second, mu)]
    return mu, [(v.clamp_min(0) + SIGMA_FLOOR).sqrt() for v in var]


class LearnedGenerator:
    """`generate(descriptions)` from a trained CVAE. `space` passes a description space already
    built (training's, with the registry's descriptions encoded); otherwise one is made from
    `head`, `encoder` and the `known_vectors` a checkpoint kept. The registry's checkpoints are read
    on first use only."""

    inline_examples: bool = True  # rows without examples read the pairs their description writes out
    compile_decoder: bool = False  # decode under torch.compile / CUDA graphs (`compiled_decode.py`)

    def __init__(self, registry: Registry, model: LoraCVAE, safety: Safety, config: CheckpointConfig, *,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 head: DescriptionHead | None = None, encoder: DescriptionEncoder | None = None,
                 space: DescriptionSpace | None = None, known_vectors: KnownVectors | None = None) -> None:
        self.registry, self.safety, self.config = registry, safety, config
        self.method = model.config.method
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        # Normalisation stays in float32 whatever the decoder's dtype.
        self.stats: Stats = tuple([t.detach().to("cpu", torch.float32).clone() for t in ts]  # type: ignore[assignment]
                                  for ts in model.stats())
        self.model = model.to(self.device, self.dtype).eval()
        if space is None:
            tokens = RegistryTokens(registry, model.layout, set(config.generator.holdout))
            space = DescriptionSpace(registry, tokens, top_k=model.config.top_k,
                                     temperature=model.config.temperature, head=head, encoder=encoder,
                                     known=known_vectors)
        self.space = space
        self.tokens = space.tokens

    @property
    def holdout(self) -> set[str]:
        return set(self.config.generator.holdout)

    @property
    def task_vector_dim(self) -> int:
        """Width of the in-context task vector the generator was trained with; 0: none."""
        return self.config.task_vector_dim

    @property
    def head(self) -> DescriptionHead | None:
        return self.space.head

    @property
    def encoder(self) -> DescriptionEncoder | None:
        return self.space.encoder

    def experts(self) -> list[Expert]:
        """The registry experts the generator learned from, in its column order."""
        return self.tokens.experts

    def expert_tokens(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every checkpoint of those experts as normalised tokens per group, and each one's column."""
        return self.tokens.tokens(self.stats)

    # ------------------------------------------------------------ reading a description
    def embed(self, descriptions: list[str]) -> np.ndarray:
        """Descriptions as unit rows in the generator's description space (`DescriptionSpace.embed`)."""
        return self.space.embed(descriptions)

    def search(self, query: np.ndarray, own: list[int | None] | None = None, k: int | None = None) -> list[list[Hit]]:
        """Top-K experts for each `query` row (`DescriptionSpace.search`)."""
        return self.space.search(query, own, k)

    def memory_weights(self, query: torch.Tensor) -> torch.Tensor:
        """icm's memory read at training's conditions (`DescriptionSpace.memory_weights`)."""
        return self.space.memory_weights(query)

    def candidates(self, query: np.ndarray, example_sets: Sequence[Sequence[Example]]) -> list[list[Hit]]:
        """Each row's top-K experts; the top EXAMPLE_CANDIDATES for rows whose examples will weigh them."""
        if not applies(self.registry.spec, example_sets):
            return self.search(query)
        return candidates(lambda n: self.search(query, k=n), self.model.config.top_k, example_sets)

    @cached_property
    def expert_stack(self) -> LoraStack:
        """The generator's experts' final LoRAs, in column order, on the generator's device."""
        return self.registry.expert_stack(self.tokens.experts, self.device)

    def example_evidence(self, example_sets: Sequence[Sequence[Example]], hits: list[list[Hit]]) -> Evidence | None:
        """Per row and hit: log p(the row's examples | that hit's expert); None without examples
        or for a base model that is not a causal LM."""
        if not applies(self.registry.spec, example_sets):
            return None
        columns = [[self.space.column[h.expert_id] for h in row] for row in hits]
        return example_logprobs(self.task_vectors.base, self.expert_stack, example_sets, columns)

    # ------------------------------------------------------------ the condition
    def weights(self, hits: list[list[Hit]],
                evidence: list[list[float] | None] | None = None) -> tuple[torch.Tensor, list[list[Neighbour]]]:
        """α = softmax(sim/τ) over each row's hits, plus the examples' log-likelihood under each
        hit's expert when there is `evidence` (`example_evidence.py`)."""
        column = self.space.column
        w = torch.zeros(len(hits), len(column))
        neighbours = []
        for row, row_hits in enumerate(hits):
            row_evidence = evidence[row] if evidence is not None and evidence[row] else None
            alpha = reweigh([h.similarity for h in row_hits], self.model.config.temperature, row_evidence)
            neighbours.append([Neighbour(h.name, h.expert_id, h.similarity, a,
                                         row_evidence[k] if row_evidence is not None else None)
                               for k, (h, a) in enumerate(zip(row_hits, alpha))])
            for h, a in zip(row_hits, alpha):
                w[row, column[h.expert_id]] = a
        return w, neighbours

    @property
    def reads_memory(self) -> bool:
        return self.method == "icm" and self.model.config.condition_from == "memory"

    @cached_property
    def prototypes(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per group (E, T_g, W_g) on the generator's device: each expert's mean and second moment."""
        mean, second = self.tokens.prototypes(self.stats)
        return [m.to(self.device) for m in mean], [s.to(self.device) for s in second]

    def conditions(self, vecs: np.ndarray, hits: list[list[Hit]],
                   evidence: list[list[float] | None] | None = None) -> tuple[Any, ...]:
        """(text, μ*, σ*, neighbours): the decoder's condition per row. icm reading memory conditions
        on Σ α_k · key_k instead of the description; sg adds the prior mixture (μ*, σ*)."""
        w, neighbours = self.weights(hits, evidence)
        text = torch.from_numpy(vecs).to(self.device)
        if self.reads_memory:
            text = (w @ self.space.memory_keys).to(self.device)
        if self.method != "sg":
            return text, None, None, neighbours
        # rows with examples may weigh up to EXAMPLE_CANDIDATES experts; one k for every batch
        k = min(max(self.model.config.top_k, EXAMPLE_CANDIDATES), w.shape[1])
        mu, sigma = mix(w.to(self.device), *self.prototypes, k=k)
        return text, mu, sigma, neighbours

    @cached_property
    def task_vectors(self) -> TaskVectors:
        return TaskVectors(self.registry.spec, device=str(self.device))

    def task_condition(self, example_sets: Sequence[Sequence[Example]]) -> torch.Tensor:
        """(N, dim + 1): the task vector and a 1 flag for rows with examples, zeros for the rest."""
        out = torch.zeros(len(example_sets), self.task_vector_dim + 1)
        rows = [i for i, s in enumerate(example_sets) if s]
        if rows:
            vecs = self.task_vectors.vectors([example_sets[i] for i in rows])
            if vecs.shape[1] != self.task_vector_dim:
                raise GenerationError(f"the base model gives task vectors of width {vecs.shape[1]}, "
                                      f"the generator was trained on {self.task_vector_dim}")
            out[rows, :-1], out[rows, -1] = vecs, 1.0
        return out

    # ------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, descriptions: list[str], *, examples: list[list[dict[str, str]]] | None = None,
                 seed: int | None = None, num_samples: int = 1) -> list[Lora]:
        """`num_samples` LoRAs per description, in order. The noise depends only on `seed` and the
        sample index, so a batch gives the same LoRAs as one call per description.

        `examples` (one list of {input, output} per description, possibly empty) re-weigh the
        top-K experts by how well each explains them (causal LMs, `example_evidence.py`) and add
        ICM-LoRA's in-context task vector when the generator was trained with examples;
        `examples_used` in the metadata says whether they were used. A row without examples uses
        the input -> output pairs its description writes out, unless `inline_examples` is False
        (`inline_examples.py`; `examples_from_description` in the metadata)."""
        descriptions = check_descriptions(descriptions)
        example_sets = check_examples(examples, len(descriptions))
        inline = [False] * len(descriptions)
        if self.inline_examples:
            example_sets, inline = with_inline_examples(descriptions, example_sets, self.task_vectors)
        if num_samples < 1:
            raise GenerationError("num_samples must be at least 1")
        seed = secrets.randbits(31) if seed is None else int(seed)
        query = self.embed(descriptions)
        hits = self.candidates(query, example_sets)
        evidence = self.example_evidence(example_sets, hits)
        text, mu, sigma, neighbours = self.conditions(query, hits, evidence.logprobs if evidence else None)
        if self.task_vector_dim:
            text = torch.cat([text, self.task_condition(example_sets).to(text)], dim=-1)
        noise = torch.randn(num_samples, self.model.config.latent, generator=torch.Generator().manual_seed(seed))
        B = self.fused_decode(text, mu, sigma, noise)
        norms = self.safety.norms(B)
        self.safety.check_finite(B, descriptions, norms)
        B, clipped = self.safety.clip(B, norms)
        loras = []
        for i in range(len(descriptions) * num_samples):
            d, s = divmod(i, num_samples)
            nearest = neighbours[d][0].similarity if neighbours[d] else -1.0
            meta = {"method": self.method, "description": descriptions[d], "seed": seed, "sample": s,
                    "neighbours": [asdict(n) for n in neighbours[d]], "nearest_similarity": nearest,
                    "ood": self.safety.is_ood(nearest), "clipped": bool(clipped[i]),
                    "ambiguous": ambiguous(neighbours[d])}
            used = bool(example_sets[d]) and (evidence is not None or self.task_vector_dim > 0)
            meta.update(examples_metadata(used, inline[d], evidence, d))
            loras.append(self.registry.basis.lora({m: b[i] for m, b in B.items()}, meta))
        return loras

    def decode(self, text: torch.Tensor, mu: list[torch.Tensor] | None, sigma: list[torch.Tensor] | None,
               noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """The fused pass: (N requests × S samples) rows, every token through the same GEMMs."""
        s, dt = noise.shape[0], self.dtype
        rep = lambda x: repeat(x.to(self.device, dt), "n ... -> (n s) ...", s=s)  # noqa: E731
        text = rep(text)
        mu = [rep(m) for m in mu] if mu is not None else None
        sigma = [rep(x) for x in sigma] if sigma is not None else None
        cond, feats = self.model.encode_condition(text, mu, sigma)
        mu_p, lv_p = self.model.prior(cond)
        eps = repeat(noise.to(self.device, dt), "s d -> (n s) d", n=text.shape[0] // s)
        z = mu_p + (0.5 * lv_p).exp() * eps
        offsets = self.model.offsets()
        if self.method == "icm":  # the heads write denormalised tokens in `dt` directly
            groups = self.model.decoder.denormalised(torch.cat([z, cond], dim=-1), self._folded, *self._stats_on)
            if offsets is not None:
                groups = [g + o.to(g) for g, o in zip(groups, offsets)]
            return self.model.layout.to_modules(groups)
        out = [g.float() for g in self.model.decode(z, cond, feats, mu, sigma)]
        groups = denormalise(out, *self._stats_on)
        if offsets is not None:
            groups = [g + o.to(g) for g, o in zip(groups, offsets)]
        return {m: b.to(dt) for m, b in self.model.layout.to_modules(groups).items()}

    @cached_property
    def fused_decode(self) -> Decode:
        """`decode`, or its compiled form when `compile_decoder` was set before the first generation."""
        if not self.compile_decoder:
            return self.decode
        self._stats_on  # noqa: B018 - made eagerly: a tensor first made inside a CUDA graph lives in its memory
        if self.method == "icm":
            self._folded  # noqa: B018
        return CompiledDecode(self.decode, torch.device(self.device))

    @cached_property
    def _folded(self) -> list[torch.Tensor]:
        return self.model.decoder.folded_heads()

    @cached_property
    def _stats_on(self) -> Stats:
        return tuple([t.to(self.device) for t in ts] for ts in self.stats)  # type: ignore[return-value]

    # ------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the generator to `directory` (`persistence.py`)."""
        return persistence.save(persistence.Checkpoint(self.config, self.model, self.safety, self.head, self.encoder,
                                                       self.space.known_vectors()), directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, registry: Registry, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> LearnedGenerator:
        """A generator saved by `save_pretrained`, in either config layout, for `registry`."""
        saved = persistence.load(directory, registry)
        return cls(registry, saved.model, saved.safety, saved.config, device=device, dtype=dtype,
                   head=saved.head, encoder=saved.encoder, known_vectors=saved.known_vectors)
