"""A bounded local tier in front of a shared store: what one serving replica keeps in memory.

``open_store(url, namespace, tier_blocks=N)`` opens the shared store without its own CPU copy
and puts an LRU of ``N`` blocks in front of it: reads look in the tier first (``LOCAL``), then
in the shared store (``REMOTE``, and the value enters the tier); writes go to the shared store
and, once it took them, into the tier. So how often a replica finds its blocks at hand depends
on what it was sent, which is what affinity routing is meant to improve.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import fields

import torch

from ..errors import ConfigError
from .base import LOCAL, REMOTE, BlockStore, Read, StoreStats, check_key


class TieredStore(BlockStore):
    """An LRU of ``capacity`` blocks (this process's memory) over ``shared``."""

    def __init__(self, shared: BlockStore, capacity: int):
        if capacity < 1:
            raise ConfigError(f"tier_blocks must be >= 1, got {capacity}")
        super().__init__(shared.url, shared.namespace)
        self.shared, self.capacity = shared, capacity
        self.can_delete = shared.can_delete
        self._tier: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, key: int, kv: torch.Tensor) -> None:
        self.batched_put([(key, kv)])

    def get(self, key: int) -> torch.Tensor | None:
        return self.batched_read([key])[0].value

    def contains(self, key: int) -> bool:
        return self.batched_contains([key])[0]

    def delete(self, key: int) -> bool:
        with self._lock:
            self._tier.pop(key, None)
        return self.shared.delete(key)

    def batched_put(self, items: Sequence[tuple[int, torch.Tensor]], placement=None) -> list[int]:
        failed = self.shared.batched_put(items, placement)
        refused = set(failed)
        self._keep([(key, kv) for key, kv in items if key not in refused])
        return failed

    def batched_read(self, keys: Sequence[int], placement=None) -> list[Read]:
        with self._lock:
            local = [self._take(check_key(key)) for key in keys]
        todo = [i for i, kv in enumerate(local) if kv is None]
        where = [placement[i] for i in todo] if placement else None
        fetched = self.shared.batched_read([keys[i] for i in todo], where)
        reads = [Read(kv, LOCAL) if kv is not None else None for kv in local]
        found = []
        for i, read in zip(todo, fetched, strict=True):
            reads[i] = read
            if read.value is not None:
                reads[i] = Read(read.value, REMOTE, read.node or self.shared.url)
                found.append((keys[i], read.value))
        self._keep(found)
        self._count(hits=len(keys) - len(todo))
        return reads

    def batched_get(self, keys: Sequence[int], placement=None) -> list[torch.Tensor | None]:
        return [read.value for read in self.batched_read(keys, placement)]

    def batched_contains(self, keys: Sequence[int]) -> list[bool]:
        with self._lock:
            local = [key in self._tier for key in keys]
        todo = [i for i, hit in enumerate(local) if not hit]
        for i, found in zip(todo, self.shared.batched_contains([keys[i] for i in todo]), strict=True):
            local[i] = found
        return local

    def batched_stored(self, keys: Sequence[int], placement=None) -> list[bool]:
        return self.shared.batched_stored(keys, placement)

    def close(self) -> None:
        with self._lock:
            self._tier.clear()
        self.shared.close()

    @property
    def stats(self) -> StoreStats:
        """The shared store's counters plus the tier's hits."""
        own, shared = super().stats, self.shared.stats
        names = [f.name for f in fields(StoreStats)]
        return StoreStats(**{name: getattr(own, name) + getattr(shared, name) for name in names})

    def _take(self, key: int) -> torch.Tensor | None:
        kv = self._tier.get(key)
        if kv is None:
            return None
        self._tier.move_to_end(key)
        return kv.clone()  # the caller may change its copy

    def _keep(self, items: list[tuple[int, torch.Tensor]]) -> None:
        with self._lock:
            for key, kv in items:
                self._tier[key] = kv.clone()
                self._tier.move_to_end(key)
            while len(self._tier) > self.capacity:
                self._tier.popitem(last=False)
