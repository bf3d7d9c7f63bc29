"""`LearnedGenerator`: ICM-LoRA or SG-LoRA trained on a registry, behind `generate(descriptions)`.

One model per registry, trained on every checkpoint of every expert (minus `holdout`). Held-out
experts are invisible to the generator at inference too (never a neighbour), so a held-out task is
really unseen. A checkpoint directory holds `config.json` and `model.safetensors`; `training.py` trains one.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import einsum, reduce, repeat
from safetensors.torch import load_file, save_file

from ..adapters import Lora, LoraStack, atomic
from ..registry import Expert, Hit, Registry
from ..registry.index import normalised
from .compiled_decode import CompiledDecode, Decode
from .cvae import CVAEConfig, LoraCVAE, denormalise, normalise
from .decoder import TokenLayout
from .description_encoder import PREFIX as ENCODER_PREFIX
from .description_encoder import DescriptionEncoder
from .description_head import DescriptionHead
from .errors import GenerationError
from .example_evidence import (EXAMPLE_CANDIDATES, Evidence, applies, candidates, example_logprobs, examples_metadata,
                               reweigh)
from .inline_examples import with_inline_examples
from .retrieval import Neighbour, ambiguous, check_descriptions
from .safety import Safety
from .task_vector import Example, TaskVectors, check_examples

log = logging.getLogger(__name__)
FORMAT = "loragen-generator"
STATE_NAME = "training_state.pt"
SIGMA_FLOOR = 1e-4  # added to σ*² (normalised space) so log σ* and the residual scale stay finite
# On the 2-core CPU, 32 requests at K = 4: dense 12 ms vs gathered 25 ms at 18 experts; 186 vs 16 ms at 1,000.
GATHER_EXPERTS_PER_K = 8
Stats = tuple[list[torch.Tensor], list[torch.Tensor]]  # per group (T_g,) mean and std


class RegistryTokens:
    """The registry's experts (minus held-out ones) as normalised tokens, and their prototypes."""

    def __init__(self, registry: Registry, layout: TokenLayout, holdout: set[str]) -> None:
        self.experts = [e for e in registry.experts() if e.name not in holdout]
        if not self.experts:
            raise GenerationError("no experts left to train or condition on")
        self.ids = [e.id for e in self.experts]
        self.excluded = {e.id for e in registry.experts() if e.name in holdout}
        self.raw = [registry.checkpoints(e) for e in self.experts]
        self.layout = layout

    def stats(self) -> Stats:
        tokens = self.layout.to_groups({m: torch.stack([c[m] for cps in self.raw for c in cps])
                                        for m in self.layout.spec.module_names})
        mean = [reduce(t, "c t w -> t", "mean") for t in tokens]
        std = [(reduce((t - m[:, None]) ** 2, "c t w -> t", "mean")).sqrt().clamp_min(1e-8) for t, m in zip(tokens, mean)]
        return mean, std

    def tokens(self, stats: Stats) -> tuple[list[torch.Tensor], torch.Tensor]:
        flat = [c for cps in self.raw for c in cps]
        groups = self.layout.to_groups({m: torch.stack([c[m] for c in flat]) for m in self.layout.spec.module_names})
        owner = torch.tensor([i for i, cps in enumerate(self.raw) for _ in cps])
        return normalise(groups, *stats), owner

    def prototypes(self, stats: Stats) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per group (E, T_g, W_g): each expert's checkpoint mean and second moment (σ² + μ²)."""
        tokens, owner = self.tokens(stats)
        count = torch.bincount(owner).float()[:, None, None]
        onehot = torch.nn.functional.one_hot(owner).float()
        mean = [einsum(onehot, t, "c e, c t w -> e t w") / count for t in tokens]
        second = [einsum(onehot, t * t, "c e, c t w -> e t w") / count for t in tokens]
        return mean, second


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
    inline_examples: bool = True  # rows without examples read the pairs their description writes out
    compile_decoder: bool = False  # decode under torch.compile / CUDA graphs (`compiled_decode.py`)

    def __init__(self, registry: Registry, model: LoraCVAE, safety: Safety, config: dict[str, Any], *,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 head: DescriptionHead | None = None, encoder: DescriptionEncoder | None = None) -> None:
        self.registry, self.safety, self.config, self.head, self.encoder = registry, safety, config, head, encoder
        self.method = model.config.method
        self.holdout = set(config.get("holdout", []))
        self.task_vector_dim = int(config.get("task_vector_dim", 0))  # 0: trained without examples
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        # Normalisation stays in float32 whatever the decoder's dtype.
        self.stats = tuple([t.detach().to("cpu", torch.float32).clone() for t in ts] for ts in model.stats())
        self.model = model.to(self.device, self.dtype).eval()

    @cached_property
    def _tokens(self) -> RegistryTokens:
        return RegistryTokens(self.registry, self.model.layout, self.holdout)

    @cached_property
    def _prototypes(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        mean, second = self._tokens.prototypes(self.stats)  # type: ignore[arg-type]
        return [m.to(self.device) for m in mean], [s.to(self.device) for s in second]

    def experts(self) -> list[Expert]:
        """The registry experts the generator learned from, in its column order."""
        return self._tokens.experts

    def expert_tokens(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every checkpoint of those experts as normalised tokens per group, and each one's column."""
        return self._tokens.tokens(self.stats)  # type: ignore[arg-type]

    def embed(self, descriptions: list[str]) -> np.ndarray:
        """Descriptions as the generator reads them: unit rows in its description space (the tuned
        encoder's, if any, else the registry's; then through the learned head, if any)."""
        encoder = self.encoder if self.encoder is not None else self.registry.encoder
        return self.describe(normalised(encoder.encode(descriptions)))

    def describe(self, vecs: np.ndarray) -> np.ndarray:
        """Encoder embeddings through the learned head, if any."""
        return self.head.project(vecs) if self.head is not None else vecs

    def search(self, query: np.ndarray, own: list[int | None] | None = None, k: int | None = None) -> list[list[Hit]]:
        """Top-K experts (K: the model's, unless `k`) for each `query` row (from `embed`), each scored
        by its best registry description in the generator's space; `own[i]` (leave-one-out) skipped.
        Exact, over every description of the generator's experts: held-out ones are never candidates."""
        k = min(k or self.model.config.top_k, len(self._column))
        desc, desc_owner, texts = self._described
        sims = torch.from_numpy(np.ascontiguousarray(query)) @ desc.T
        best = self._best_per_expert(sims)
        for row, o in enumerate(own or []):
            if o is not None and o in self._column:
                best[row, self._column[o]] = -torch.inf
        top = best.topk(k, dim=1)
        experts = self._tokens.experts
        hits = []
        for row, (values, columns) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            row_hits = []
            for sim, col in zip(values, columns):
                if sim == -torch.inf:
                    continue
                text = texts[int(sims[row].masked_fill(desc_owner != col, -torch.inf).argmax())]
                row_hits.append(Hit(experts[col].id, experts[col].name, text, sim))
            hits.append(row_hits)
        return hits

    @cached_property
    def _column(self) -> dict[int, int]:
        """Expert id -> its column in the generator's expert order."""
        return {eid: i for i, eid in enumerate(self._tokens.ids)}

    @cached_property
    def _described(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """The registry's descriptions in the generator's space, each one's expert column, and texts."""
        texts, vecs, owners = registry_descriptions(self.registry, self._tokens)
        if self.encoder is not None:
            vecs = normalised(self.encoder.encode(texts))
        return self.described(texts, vecs, owners)

    def described(self, texts: list[str], vecs: np.ndarray,
                  owners: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """`_described` from the registry's descriptions already encoded (by `encoder` if it has one)."""
        return torch.from_numpy(self.describe(vecs)), torch.tensor([self._column[o] for o in owners.tolist()]), texts

    def _best_per_expert(self, sims: torch.Tensor) -> torch.Tensor:
        """(N, descriptions) similarities -> (N, E): each expert scored by its best description."""
        col = self._described[1]
        best = torch.full((len(sims), len(self._column)), -torch.inf)
        return best.scatter_reduce(1, col.expand(len(sims), -1), sims, "amax")

    def weights(self, hits: list[list[Hit]],
                evidence: list[list[float] | None] | None = None) -> tuple[torch.Tensor, list[list[Neighbour]]]:
        """α = softmax(sim/τ) over each row's hits, plus the examples' log-likelihood under each
        hit's expert when there is `evidence` (`example_evidence.py`)."""
        column = self._column
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

    @cached_property
    def _expert_stack(self) -> LoraStack:
        """The generator's experts' final LoRAs, in column order, on the generator's device."""
        return self.registry.expert_stack(self._tokens.experts, self.device)

    def candidates(self, query: np.ndarray, example_sets: Sequence[Sequence[Example]]) -> list[list[Hit]]:
        """Each row's top-K experts; the top EXAMPLE_CANDIDATES for rows whose examples will weigh them."""
        if not applies(self.registry.spec, example_sets):
            return self.search(query)
        return candidates(lambda n: self.search(query, k=n), self.model.config.top_k, example_sets)

    def example_evidence(self, example_sets: Sequence[Sequence[Example]], hits: list[list[Hit]]) -> Evidence | None:
        """Per row and hit: log p(the row's examples | that hit's expert); None without examples
        or for a base model that is not a causal LM."""
        if not applies(self.registry.spec, example_sets):
            return None
        columns = [[self._column[h.expert_id] for h in row] for row in hits]
        return example_logprobs(self.task_vectors.base, self._expert_stack, example_sets, columns)

    @property
    def reads_memory(self) -> bool:
        return self.method == "icm" and self.model.config.condition_from == "memory"

    @cached_property
    def _memory_keys(self) -> torch.Tensor:
        """(E, dim): each expert's unit mean description, in the generator's space."""
        desc, col, _ = self._described
        keys = torch.zeros(len(self._column), desc.shape[1]).index_add_(0, col, desc)
        return torch.nn.functional.normalize(keys, dim=-1)

    def memory_weights(self, query: torch.Tensor) -> torch.Tensor:
        """(N, E) softmax weights over each row's top-K experts, scored by their best description,
        with row i's own registry description left out: training's view of a paraphrase that the
        registry does not hold (rows are the registry's descriptions in `_described` order).
        A row whose left-out read would rank another expert first reads with its own description in:
        a condition at expert B's key with expert A's LoRA as target teaches the decoder to average
        A and B (benchmarks/RESULTS.md, "Twice the registry paraphrases"). This also keeps an expert's
        only description in, so that its key is a training condition too."""
        desc, col, _ = self._described
        sims = query @ desc.T
        left_out = sims.clone()
        left_out.diagonal().fill_(-torch.inf)
        best = self._best_per_expert(left_out)
        misread = best.argmax(dim=1) != col
        best[misread] = self._best_per_expert(sims[misread])
        top = best.topk(min(self.model.config.top_k, best.shape[1]), dim=1)
        alpha = torch.softmax(top.values / self.model.config.temperature, dim=1)
        return torch.zeros_like(best).scatter_(1, top.indices, alpha)

    def conditions(self, vecs: np.ndarray, hits: list[list[Hit]],
                   evidence: list[list[float] | None] | None = None) -> tuple[Any, ...]:
        w, neighbours = self.weights(hits, evidence)
        text = torch.from_numpy(vecs).to(self.device)
        if self.reads_memory:
            text = (w @ self._memory_keys).to(self.device)
        if self.method != "sg":
            return text, None, None, neighbours
        # rows with examples may weigh up to EXAMPLE_CANDIDATES experts; one k for every batch
        k = min(max(self.model.config.top_k, EXAMPLE_CANDIDATES), w.shape[1])
        mu, sigma = mix(w.to(self.device), *self._prototypes, k=k)
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
        B = self._decode(text, mu, sigma, noise)
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
    def _decode(self) -> Decode:
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
    def _stats_on(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return tuple([t.to(self.device) for t in ts] for ts in self.stats)  # type: ignore[return-value]

    # ------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.model.state_dict().items()}
        state.update({k: v.contiguous() for k, v in self.safety.state_dict().items()})
        for extra in (self.head, self.encoder):
            if extra is not None:
                state.update(extra.state_dict())
        with atomic.directory(directory) as tmp:
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
            if (directory / STATE_NAME).is_file():  # keep the resumable training state
                shutil.copy2(directory / STATE_NAME, tmp / STATE_NAME)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, registry: Registry, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> LearnedGenerator:
        directory = Path(directory)
        try:
            config = json.loads((directory / "config.json").read_text())
            tensors = load_file(str(directory / "model.safetensors"))
        except (OSError, ValueError) as exc:
            raise GenerationError(f"{directory} is not a loragen generator checkpoint: {exc}") from exc
        if config.get("format") != FORMAT:
            raise GenerationError(f"{directory}/config.json is not a {FORMAT} config")
        check_compatible(config, registry, str(directory))
        layout = TokenLayout(registry.spec)
        tv = int(config.get("task_vector_dim", 0))
        model = LoraCVAE(layout, CVAEConfig(**config["cvae"]), int(config["embedding_dim"]) + (tv + 1 if tv else 0))
        extras = ("safety.", "description_head.", ENCODER_PREFIX)
        model_state = {k: v for k, v in tensors.items() if not k.startswith(extras)}
        for name, buffer in model.named_buffers():  # checkpoints from before condition centring
            if name.startswith("text_") and name not in model_state:
                model_state[name] = buffer
        try:
            model.load_state_dict(model_state)
        except RuntimeError as exc:
            raise GenerationError(f"{directory}: weights do not fit the registry's spec: {exc}") from exc
        safety = Safety.from_state_dict(tensors, float(config["ood_threshold"]))
        head = DescriptionHead.from_state_dict(tensors, config.get("description_head"))
        encoder = DescriptionEncoder.from_state_dict(registry.encoder, tensors, config.get("description_encoder"))
        return cls(registry, model, safety, config, device=device, dtype=dtype, head=head, encoder=encoder)


def check_compatible(config: dict[str, Any], registry: Registry, where: str) -> None:
    from ..adapters import LoraSpec

    spec = LoraSpec.from_dict(config["spec"])
    mine = registry.spec
    if spec.shape_key() != mine.shape_key() or spec.rank != mine.rank:
        raise GenerationError(f"generator {where} was trained for another base model or rank "
                              f"(spec {spec.fingerprint()} r={spec.rank}, registry {mine.fingerprint()} r={mine.rank})")
    if config["basis_sha256"] != registry.basis.sha256():
        raise GenerationError(f"generator {where} was trained on another basis; retrain it on this registry")
    if config["embedding_model"] != registry.encoder.model_id:
        raise GenerationError(f"generator {where} uses embeddings of {config['embedding_model']}, "
                              f"the registry {registry.encoder.model_id}")
    if config.get("registry_fingerprint") != registry.fingerprint():
        log.warning("generator %s was trained on a different state of the registry", where)


def registry_descriptions(registry: Registry, tokens: RegistryTokens) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The descriptions of the experts the generator learns from: texts, unit registry-encoder
    embeddings and owners (expert ids)."""
    ids, owners, vecs = registry.store.embeddings(registry.dim)
    texts = dict(registry.store.descriptions())
    known = set(tokens.ids)
    keep = [i for i, o in enumerate(owners.tolist()) if o in known]
    return [texts[int(ids[i])] for i in keep], normalised(vecs[keep]), owners[keep]
