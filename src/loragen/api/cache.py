"""An LRU cache bounded by the total size of its values in bytes, safe to share between threads."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

import torch

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class ByteLRU(Generic[K, V]):
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.size = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: K) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: K, value: V, size: int) -> bool:
        """Store `value`; False when it alone is larger than the whole cache (then it is not kept)."""
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.size -= old[1]
            if size > self.capacity:
                return False
            self._items[key] = (value, size)
            self.size += size
            while self.size > self.capacity:
                _, (_, evicted) = self._items.popitem(last=False)
                self.size -= evicted
            return True

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.size = 0

    def items(self) -> list[tuple[K, V]]:
        """A snapshot, least recently used first; neither counted as hits nor made recent."""
        with self._lock:
            return [(key, value) for key, (value, _) in self._items.items()]

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items
