"""The FAISS index over description embeddings: exact cosine search on L2-normalised rows.

On `to("cuda")` searches run on a GPU copy of the index (faiss's GPU build, the `gpu` extra);
the CPU index stays the one that is changed and saved, and the GPU copy is made again after a
change. Without the GPU build or without a GPU, the CPU index serves and one log line says why.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ..adapters import atomic

log = logging.getLogger(__name__)

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


def gpu_unavailable(device: str) -> str | None:
    """Why FAISS cannot search on `device` ("cuda", "cuda:N"), or None when it can."""
    if not hasattr(faiss, "StandardGpuResources"):
        return "this faiss has no GPU support (pip install 'loragen[gpu]')"
    gpu = int(device.partition(":")[2] or 0)
    if faiss.get_num_gpus() <= gpu:
        return f"faiss sees {faiss.get_num_gpus()} GPU(s), so there is no {device}"
    return None


def normalised(vecs: np.ndarray) -> np.ndarray:
    vecs = np.array(vecs, dtype=np.float32, copy=True, ndmin=2)
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    return vecs / np.maximum(norms, 1e-12)


class VectorIndex:
    """`IndexIDMap2(IndexFlatIP)`; ids are the description ids of the registry's SQLite."""

    def __init__(self, dim: int, index: faiss.Index | None = None) -> None:
        self.dim = dim
        self.index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self.device = "cpu"  # where searches run
        self._gpu: Any = None  # (resources, GPU copy of index), made on demand

    def to(self, device: str) -> VectorIndex:
        """Search on `device` from now on; on "cuda" without GPU FAISS, stay on the CPU and log why."""
        if device.startswith("cuda"):
            why = gpu_unavailable(device)
            if why is not None:
                log.warning("FAISS index stays on the CPU: %s", why)
                device = "cpu"
        self.device, self._gpu = device, None
        return self

    def _searcher(self) -> Any:
        if self.device == "cpu":
            return self.index
        if self._gpu is None:
            res = faiss.StandardGpuResources()
            self._gpu = (res, faiss.index_cpu_to_gpu(res, int(self.device.partition(":")[2] or 0), self.index))
        return self._gpu[1]

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
            self._gpu = None

    def remove(self, ids: list[int]) -> None:
        if ids:
            self.index.remove_ids(np.asarray(ids, dtype=np.int64))
            self._gpu = None

    def search(self, vecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, ids), each (n, k); id -1 where fewer than k vectors exist."""
        queries = normalised(vecs)
        with _one_thread() if len(queries) * len(self) < SINGLE_THREAD_PRODUCTS else nullcontext():
            return self._searcher().search(queries, k)
