"""One registry, many processes: a write lock across processes, and in-memory indexes that follow
what other processes committed.

Writers (add, remove, reindex, rebase) hold `registry.lock` (a `filelock` lock file beside the
database) from their first blob to the saved FAISS file, on top of SQLite's own write lock. So
two writers never interleave blob writes, garbage collection and index saves, and a blob one of
them is about to reference is never collected by the other.

A registry opened read-only (`Registry.open(read_only=True)`, e.g. a Ray Serve replica) has a
lock that refuses every write at once, and its SQLite connection is read-only too.

Readers take no lock. SQLite hands each query a committed snapshot, and `PRAGMA data_version`
tells a connection when another one has committed; the registry then brings its in-memory index
up to date from SQLite (only the descriptions added or removed) before it searches. A search
therefore never names an expert that is not whole in SQLite, and sees a new expert as soon as its
transaction has committed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from filelock import FileLock

from ..errors import ReadOnlyError

from .index import VectorIndex
from .store import Store

LOCK_NAME = "registry.lock"
LOCK_TIMEOUT_S = 600.0  # a writer waits this long for another before giving up


def write_lock(path: Path) -> FileLock:
    """The registry's cross-process write lock (re-entrant within a process)."""
    return FileLock(str(path / LOCK_NAME), timeout=LOCK_TIMEOUT_S)


class ReadOnlyLock:
    """The write lock of a registry opened read-only: taking it is the error."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        raise ReadOnlyError(f"the registry at {self.path} is open read-only; open it for writing to change it")

    def __exit__(self, *exc: object) -> None:
        return None


class IndexFollower:
    """Keeps `index` equal to the descriptions in `store`, cheaply: nothing to do unless another
    connection committed since the last look."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.version = store.data_version()

    def changed(self) -> bool:
        version = self.store.data_version()
        if version == self.version:
            return False
        self.version = version
        return True

    def sync(self, index: VectorIndex) -> bool:
        """Add the descriptions SQLite has and the index lacks, drop the ones it no longer has;
        returns whether anything changed."""
        have = set(index.ids().tolist())
        want = set(self.store.description_ids().tolist())
        gone, new = sorted(have - want), sorted(want - have)
        index.remove(gone)
        if new:
            ids, vecs = self.store.embeddings_of(new)
            index.add(ids, vecs)
        return bool(gone or new)
