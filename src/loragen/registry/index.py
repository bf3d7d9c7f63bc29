"""The FAISS index over description embeddings: exact cosine search on L2-normalised rows."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import faiss
import numpy as np

from ..adapters import atomic


# Below this many query-vector products a search takes well under a millisecond, and waking an
# OpenMP team costs more than it saves: its threads then spin on the cores the text encoder needs
# next, slowing the encoding and lengthening the search's tail in a server's cycle.
SINGLE_THREAD_PRODUCTS = 1 << 22


@contextmanager
def _one_thread() -> Iterator[None]:
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def normalised(vecs: np.ndarray) -> np.ndarray:
    vecs = np.array(vecs, dtype=np.float32, copy=True, ndmin=2)
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    return vecs / np.maximum(norms, 1e-12)


class VectorIndex:
    """`IndexIDMap2(IndexFlatIP)`; ids are the description ids of the registry's SQLite."""

    def __init__(self, dim: int, index: faiss.Index | None = None) -> None:
        self.dim = dim
        self.index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    @classmethod
    def build(cls, dim: int, ids: np.ndarray, vecs: np.ndarray) -> VectorIndex:
        index = cls(dim)
        index.add(ids, vecs)
        return index

    @classmethod
    def load(cls, path: Path, dim: int) -> VectorIndex | None:
        """The saved index, or None when it is missing, unreadable or of another dimension."""
        try:
            data = np.frombuffer(Path(path).read_bytes(), dtype=np.uint8)
            index = faiss.deserialize_index(data)
        except (OSError, RuntimeError):
            return None
        if index.d != dim or not hasattr(index, "id_map"):
            return None
        return cls(dim, index)

    def save(self, path: Path) -> None:
        atomic.write_bytes(Path(path), faiss.serialize_index(self.index).tobytes())

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def ids(self) -> np.ndarray:
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(normalised(vecs), np.asarray(ids, dtype=np.int64))

    def remove(self, ids: list[int]) -> None:
        if ids:
            self.index.remove_ids(np.asarray(ids, dtype=np.int64))

    def search(self, vecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, ids), each (n, k); id -1 where fewer than k vectors exist."""
        queries = normalised(vecs)
        with _one_thread() if len(queries) * len(self) < SINGLE_THREAD_PRODUCTS else nullcontext():
            return self.index.search(queries, k)
