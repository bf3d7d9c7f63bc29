"""An LRU cache bounded by the total size of its values in bytes, safe to share between threads.

`cachetools.LRUCache` keeps the order and evicts; this wrapper adds the lock, the hit and miss
counters the metrics report, and a caller-given size per value (the size of a LoRA is known
where it is made, not from the value alone).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Hashable
from typing import TYPE_CHECKING, Generic, TypeVar

from cachetools import LRUCache

if TYPE_CHECKING:
    import torch

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _stored_size(item: tuple[object, int]) -> int:
    return item[1]


class ByteLRU(Generic[K, V]):
    """At most `capacity` bytes of values; putting more evicts the least recently used first.

    `get` counts a hit or a miss and makes the key the most recent; `in`, `len` and `items`
    neither count nor reorder."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: LRUCache[K, tuple[V, int]] = LRUCache(maxsize=capacity, getsizeof=_stored_size)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def size(self) -> int:
        """The bytes held now: the sum of the sizes given to `put` for the values still kept."""
        return int(self._items.currsize)

    def get(self, key: K) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self.hits += 1
            return item[0]

    def put(self, key: K, value: V, size: int) -> bool:
        """Store `value`; False when it alone is larger than the whole cache (then it is not kept,
        and neither is an older value under the same key)."""
        with self._lock:
            self._items.pop(key, None)
            if size > self.capacity:
                return False
            self._items[key] = (value, size)
            return True

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def items(self) -> list[tuple[K, V]]:
        """A snapshot, least recently used first; neither counted as hits nor made recent."""
        with self._lock:
            drained = copy.copy(self._items)  # a copy keeps the recency order; popitem yields it
        out: list[tuple[K, V]] = []
        while drained:
            key, (value, _) = drained.popitem()
            out.append((key, value))
        return out

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items
