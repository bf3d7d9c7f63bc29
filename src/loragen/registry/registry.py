"""`Registry`: experts in SQLite, checkpoints as content-addressed safetensors, FAISS over descriptions.

Write order, so that a crash at any moment leaves a usable registry: blobs first (temp + rename;
an orphan blob is harmless), then one SQLite transaction, then the derived files (FAISS index,
`basis.safetensors`), which `open()` repairs when they lag behind SQLite. Every write holds the
registry's cross-process lock, and searches follow other processes' commits (`sharing.py`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load

from ..adapters import Basis, Lora, LoraSpec, LoraStack, Projection, SpecError, atomic
from ..embeddings.text import TextEncoder
from .blobs import Blobs, read_checked, sha256
from .index import VectorIndex, normalised
from .records import BASIS_NAME, Expert, Hit, RegistryError, best_per_expert
from .sharing import IndexFollower, ReadOnlyLock, write_lock
from .store import Store

log = logging.getLogger(__name__)

DB_NAME = "registry.sqlite"
INDEX_NAME = "index.faiss"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Registry:
    def __init__(self, path: Path, store: Store, spec: LoraSpec, basis: Basis, encoder: TextEncoder,
                 dim: int, index: VectorIndex) -> None:
        self.path, self.store, self.spec, self.basis = path, store, spec, basis
        self.encoder, self.dim, self.index = encoder, dim, index
        self.blobs = Blobs(path)
        self._stale_embeddings = False
        self.lock, self._follower = write_lock(path), IndexFollower(store)  # see sharing.py
        self.device = "cpu"

    # ---------------------------------------------------------------- create / open
    @classmethod
    def create(cls, path: str | Path, spec: LoraSpec, *, encoder: TextEncoder,
               basis: Basis | None = None, seed: int = 0) -> Registry:
        path = Path(path).resolve()
        if (path / DB_NAME).exists():
            raise RegistryError(f"a registry already exists at {path}")
        if path.exists() and any(path.iterdir()):
            raise RegistryError(f"{path} exists and is not empty; pick a new directory")
        basis = basis or Basis.seeded(spec, seed)
        if basis.spec.shape_key() != spec.shape_key() or basis.spec.rank != spec.rank:
            raise RegistryError("the given basis does not match the spec (modules or rank differ)")
        dim = encoder.dim
        with atomic.directory(path) as tmp:  # the registry appears whole or not at all
            data = basis.to_bytes()
            Blobs(tmp).write_basis(data)
            atomic.write_bytes(tmp / BASIS_NAME, data)
            VectorIndex(dim).save(tmp / INDEX_NAME)
            store = Store(tmp / DB_NAME)
            with store.transaction():
                for key, value in {
                    "spec": json.dumps(spec.to_dict()),
                    "embedding_model": encoder.model_id,
                    "embedding_dim": str(dim),
                    "basis_sha256": sha256(data),
                    "created": _now(),
                }.items():
                    store.set_meta(key, value)
            store.close()
        return cls.open(path, encoder=encoder)

    @classmethod
    def open(cls, path: str | Path, *, encoder: TextEncoder | None = None, allow_encoder_change: bool = False,
             device: str = "cpu", read_only: bool = False) -> Registry:
        """Open a registry. With `allow_encoder_change`, a different encoder is accepted and
        `reindex()` must run before anything that embeds text. `device`: where FAISS searches.
        `read_only`: every write raises `RegistryError`; it still sees other processes' writes."""
        path = Path(path).resolve()
        if not (path / DB_NAME).is_file():
            raise RegistryError(f"no registry at {path} (create one with `loragen registry init {path} --base MODEL`)")
        try:
            store = Store(path / DB_NAME, read_only=read_only)
            meta = store.meta()
            spec = LoraSpec.from_dict(json.loads(meta["spec"]))
            dim, model_id = int(meta["embedding_dim"]), meta["embedding_model"]
        except (sqlite3.DatabaseError, KeyError, ValueError, TypeError) as exc:
            raise RegistryError(f"{path / DB_NAME} is not a readable loragen registry: {exc}") from exc
        basis = cls._load_basis(path, spec, meta["basis_sha256"])
        stale = False
        if encoder is None:
            encoder = TextEncoder(model_id)  # loads lazily: opening needs no model
        else:
            # Compare ids first: reading a foreign encoder's dim would load its model.
            theirs = encoder.model_id if encoder.model_id != model_id else None
            if theirs is None and encoder.dim != dim:
                theirs = f"{encoder.model_id} (dim {encoder.dim})"
            if theirs is not None and not allow_encoder_change:
                raise RegistryError(
                    f"the registry's descriptions were embedded with {model_id} (dim {dim}), not with "
                    f"{theirs}; run `loragen registry reindex --encoder ...` to switch"
                )
            stale = theirs is not None
        reg = cls(path, store, spec, basis, encoder, dim, VectorIndex(dim))
        reg._stale_embeddings, reg.device = stale, device
        reg.lock = ReadOnlyLock(path) if read_only else reg.lock  # type: ignore[assignment]
        reg._load_index()
        return reg

    @staticmethod
    def _load_basis(path: Path, spec: LoraSpec, sha: str) -> Basis:
        blob = Blobs(path).basis_path(sha)
        data = read_checked(blob, sha, "basis blob")
        top = path / BASIS_NAME
        if not top.is_file() or sha256(top.read_bytes()) != sha:  # a rebase crashed before replacing it
            atomic.write_bytes(top, data)
        try:
            return Basis(spec, load(data))
        except SafetensorError as exc:
            raise RegistryError(f"basis blob {blob} is unreadable: {exc}") from exc

    def _load_index(self) -> None:
        ids, _, vecs = self.store.embeddings(self.dim)
        index = VectorIndex.load(self.path / INDEX_NAME, self.dim)
        if index is None or not np.array_equal(np.sort(index.ids()), ids):
            log.warning("rebuilding the FAISS index of %s from SQLite (%d descriptions)", self.path, len(ids))
            index = VectorIndex.build(self.dim, ids, vecs)
            index.save(self.path / INDEX_NAME)
        self.index = index.to(self.device)
        self.device = self.index.device  # "cpu" after a fallback, so it is logged once

    def close(self) -> None:
        self.store.close()

    def fingerprint(self) -> str:
        """Changes whenever the basis or any expert's checkpoints change."""
        h = hashlib.sha256(self.store.meta()["basis_sha256"].encode())
        for e in self.experts():
            h.update(f"\n{e.id}:{','.join(e.checkpoints)}".encode())
        return h.hexdigest()

    # ---------------------------------------------------------------- reading
    def experts(self) -> list[Expert]:
        return [self._expert(row) for row in self.store.experts()]

    def get(self, key: int | str | Expert) -> Expert:
        """An expert by id (an int, or a string of ASCII digits) or else by name.

        Other Unicode digits ("¹", Arabic-Indic "٣") are names, never ids. Raises `RegistryError`
        when there is no such expert (an id past SQLite's 64-bit integers included).
        """
        if isinstance(key, Expert):
            key = key.id
        rows = []
        text = key.strip() if isinstance(key, str) else ""
        if isinstance(key, int) or (text.isascii() and text.isdigit()):
            # Past 19 digits a number cannot be a SQLite id (and int() of thousands is refused).
            number = key if isinstance(key, int) else int(text) if len(text) <= 19 else -1
            rows = self.store.experts(id=number) if -2**63 <= number < 2**63 else []
        if not rows and isinstance(key, str):
            rows = self.store.experts(name=key.strip())
        if not rows:
            raise RegistryError(f"no expert {key!r} in the registry at {self.path}")
        return self._expert(rows[0])

    def _expert(self, row: dict[str, Any]) -> Expert:
        return Expert(**row, descriptions=self.store.description_texts(row["id"]),
                      checkpoints=self.store.checkpoints(row["id"]))

    def checkpoints(self, expert: int | str | Expert) -> list[dict[str, torch.Tensor]]:
        return [self.blobs.read(sha)[0] for sha in self.get(expert).checkpoints]

    def final_b(self, expert: int | str | Expert) -> dict[str, torch.Tensor]:
        return self.blobs.read(self.get(expert).sha256)[0]

    def lora(self, expert: int | str | Expert) -> Lora:
        e = self.get(expert)
        return self.basis.lora(self.final_b(e), {"expert": e.name})

    def expert_stack(self, experts: list[Expert], device: str | torch.device = "cpu") -> LoraStack:
        """The experts' final LoRAs as one stack, in order: their Bs stacked, the basis A shared."""
        finals = [self.final_b(e) for e in experts]
        return LoraStack(self.spec, {m: a.to(device) for m, a in self.basis.A.items()},
                         {m: torch.stack([f[m] for f in finals]).to(device) for m in self.spec.module_names})

    def source(self, expert: int | str | Expert) -> Lora | None:
        """The original factors of an imported adapter, or None for an expert trained in the basis."""
        e = self.get(expert)
        if e.source_sha256 is None:
            return None
        tensors, meta = self.blobs.read(e.source_sha256)
        spec = replace(self.spec.with_rank(int(meta["rank"]), float(meta["alpha"])),
                       use_rslora=meta.get("use_rslora") == "true")
        A = {m: tensors[f"A:{m}"] for m in spec.module_names}
        B = {m: tensors[f"B:{m}"] for m in spec.module_names}
        return Lora(spec, A, B, {"expert": e.name})

    def original(self, e: Expert) -> Lora:
        """An expert's own factors: the imported adapter's, else its final B in the basis."""
        return self.source(e) or self.lora(e)

    # ---------------------------------------------------------------- adding
    def _validate(self, name: str, descriptions: list[str]) -> tuple[str, list[str]]:
        name = (name or "").strip()
        if not name:
            raise RegistryError("an expert needs a non-empty name")
        if isinstance(descriptions, str):
            descriptions = [descriptions]
        if not descriptions:
            raise RegistryError(f"expert {name!r} needs at least one description")
        texts = [str(d).strip() for d in descriptions]
        if any(not t for t in texts):
            raise RegistryError(f"expert {name!r} has an empty description")
        if self.store.experts(name=name):
            raise RegistryError(f"an expert named {name!r} already exists (remove it first or pick another name)")
        return name, texts

    def _check_b(self, name: str, B: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        s = self.spec
        if set(B) != set(s.module_names):
            raise RegistryError(f"checkpoint of {name!r} has modules {sorted(B)}, expected {sorted(s.module_names)}")
        out = {}
        for m in s.modules:
            want = (s.num_layers, m.out_features, s.rank)
            if tuple(B[m.name].shape) != want:
                raise RegistryError(f"checkpoint of {name!r}: {m.name} is {tuple(B[m.name].shape)}, expected {want}")
            out[m.name] = B[m.name].detach().to("cpu", torch.float32).contiguous()
        return out

    def _embed(self, texts: list[str]) -> np.ndarray:
        if self._stale_embeddings:
            raise RegistryError("the encoder changed; run `loragen registry reindex` first")
        vecs = self.encoder.encode(texts)
        if vecs.shape[1] != self.dim:
            raise RegistryError(f"encoder {self.encoder.model_id} gives dim {vecs.shape[1]}, the registry has {self.dim}")
        return normalised(vecs)

    def add_expert(self, name: str, checkpoints: list[dict[str, torch.Tensor]], descriptions: list[str], *,
                   metrics: dict[str, Any] | None = None, tags: list[str] | None = None,
                   fidelity: float | None = None, source: Lora | None = None) -> Expert:
        name, texts = self._validate(name, descriptions)
        if not checkpoints:
            raise RegistryError(f"expert {name!r} needs at least one checkpoint")
        checked = [self._check_b(name, B) for B in checkpoints]
        if source is not None:
            self._check_spec(source, name)
        vecs = self._embed(texts)
        with self.lock:
            expert_id = self._insert(name, texts, vecs, checked, metrics, tags, fidelity, source)
        return self.get(expert_id)

    def _insert(self, name: str, texts: list[str], vecs: np.ndarray, checked: list[dict[str, torch.Tensor]],
                metrics: dict[str, Any] | None, tags: list[str] | None, fidelity: float | None,
                source: Lora | None) -> int:
        shas = [self.blobs.write(B) for B in checked]
        source_sha = None
        if source is not None:
            tensors = {f"{ab}:{m}": t[m].detach().to("cpu", torch.float32).contiguous()
                       for ab, t in (("A", source.A), ("B", source.B)) for m in self.spec.module_names}
            meta = {"rank": str(source.spec.rank), "alpha": repr(float(source.spec.alpha)),
                    "use_rslora": str(source.spec.use_rslora).lower()}
            source_sha = self.blobs.write(tensors, meta)
        row = {"name": name, "base_model": (source.spec.base_model if source else "") or self.spec.base_model,
               "rank": self.spec.rank, "alpha": self.spec.alpha, "targets": self.spec.target_modules,
               "sha256": shas[-1], "created": _now(), "metrics": dict(metrics or {}), "tags": list(tags or []),
               "fidelity": fidelity, "source_sha256": source_sha}
        try:
            with self.store.transaction():
                expert_id = self.store.insert_expert(row)
                self.store.set_checkpoints(expert_id, shas)
                for t, v in zip(texts, vecs):
                    self.store.insert_description(expert_id, t, v)
        except Exception as exc:
            if "UNIQUE" in str(exc):
                raise RegistryError(f"an expert named {name!r} already exists") from exc
            raise
        self._save_index()
        return expert_id

    def _save_index(self) -> None:
        """With the lock held: the index as SQLite has it now (this and other processes' writes)."""
        self._follower.sync(self.index)
        self.index.save(self.path / INDEX_NAME)

    def _check_spec(self, lora: Lora, name: str) -> None:
        try:
            self.spec.check_compatible(lora.spec, what=f"adapter {name!r}")
        except SpecError as exc:
            raise RegistryError(str(exc)) from exc

    def import_adapter(self, lora: Lora, name: str, descriptions: list[str], *,
                       tags: list[str] | None = None) -> tuple[Expert, Projection]:
        """Project a foreign adapter onto the basis; its original factors are kept for rebases.

        Modules are matched by name and shape, in any order. An adapter that targets a subset of
        the registry's modules imports with zero ΔW on the others, which the projection lists in
        `absent_modules`. A module, shape or layer count the registry lacks raises a
        `RegistryError` naming it. Every check runs before anything is written.
        """
        name, _ = self._validate(name, descriptions)
        try:
            full = lora.on_modules(self.spec, what=f"adapter {name!r}")
        except SpecError as exc:
            raise RegistryError(str(exc)) from exc
        projection = self.basis.project(lora)
        expert = self.add_expert(name, [projection.B], descriptions, tags=tags,
                                 fidelity=projection.fidelity, source=full)
        return expert, projection

    # ---------------------------------------------------------------- removing
    def remove(self, key: int | str | Expert) -> None:
        with self.lock:
            e = self.get(key)
            with self.store.transaction():
                self.store.delete_expert(e.id)
            self._save_index()
            self._collect({*e.checkpoints, *([e.source_sha256] if e.source_sha256 else [])})

    def _collect(self, candidates: set[str]) -> None:
        """Delete blobs no expert refers to any more (after the commit, so a crash only orphans)."""
        self.blobs.delete(candidates - self.store.referenced_blobs())

    # ---------------------------------------------------------------- search
    def search(self, texts: list[str], k: int = 5) -> list[list[Hit]]:
        texts = [texts] if isinstance(texts, str) else texts
        return self.search_vectors(self._embed(list(texts)), k)

    def search_vectors(self, vecs: np.ndarray, k: int = 5) -> list[list[Hit]]:
        """k experts per query, each with its best-matching description, by cosine similarity."""
        vecs = normalised(vecs)
        if vecs.shape[1] != self.dim:
            raise RegistryError(f"query vectors have dim {vecs.shape[1]}, the registry has {self.dim}")
        if self._follower.changed():  # another process committed: follow it before searching
            self._follower.sync(self.index)
        n = len(self.index)
        if n == 0 or k <= 0:
            return [[] for _ in vecs]
        depth = min(n, max(4 * k, 32))
        while True:
            sims, ids = self.index.search(vecs, depth)
            info = self.store.describe(int(i) for i in np.unique(ids) if i >= 0)
            results = [best_per_expert(s, i, info, k) for s, i in zip(sims, ids)]
            if depth == n or all(len(r) == k for r in results):
                return results
            depth = min(n, depth * 4)

    def expert_embeddings(self) -> tuple[list[int], np.ndarray]:
        """Per expert, the re-normalised mean of its description embeddings (ordered by id)."""
        _, experts, vecs = self.store.embeddings(self.dim)
        order = [e["id"] for e in self.store.experts()]
        if not order:
            return [], np.zeros((0, self.dim), dtype=np.float32)
        means = np.stack([vecs[experts == e].mean(axis=0) for e in order])
        return order, normalised(means)

    # ---------------------------------------------------------------- maintenance
    def reindex(self) -> int:
        """Re-embed every description with the current encoder; returns how many."""
        with self.lock:
            return self._reindex()

    def _reindex(self) -> int:
        self._stale_embeddings = False
        rows = self.store.descriptions()
        vecs = self.encoder.encode([t for _, t in rows])
        dim = int(vecs.shape[1]) if rows else self.encoder.dim
        vecs = normalised(vecs) if rows else np.zeros((0, dim), dtype=np.float32)
        # Without an index file, open() rebuilds it from SQLite: old vectors before the commit,
        # new ones after, so a crash never pairs new ids with stale vectors.
        (self.path / INDEX_NAME).unlink(missing_ok=True)
        with self.store.transaction():
            for (i, _), v in zip(rows, vecs):
                self.store.set_embedding(i, v)
            self.store.set_meta("embedding_model", self.encoder.model_id)
            self.store.set_meta("embedding_dim", str(dim))
        self.dim = dim
        self.index = VectorIndex.build(dim, np.array([i for i, _ in rows], dtype=np.int64), vecs).to(self.device)
        self.index.save(self.path / INDEX_NAME)
        return len(rows)

    def rebase(self, rank: int) -> list[tuple[Expert, float]]:
        """A data-driven basis of `rank` from every expert's original ΔW; all experts re-projected."""
        from .rebase import rebase

        with self.lock:
            return rebase(self, rank)
