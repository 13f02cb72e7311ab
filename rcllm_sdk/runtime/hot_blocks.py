"""A bounded in-process cache of decoded block KV, in the runner's dtype and device.

A hit skips the store round trip, the codec and the header check. Keys are the blocks' content
hashes, which cover the model fingerprint, block kind and token ids, so one key names one
block's canonical KV. What may still change under a key is a value rewritten on purpose (a
forced refresh, a repaired bad value): the engine puts what it computes and drops what a
refresh rewrites, so a lookup never returns KV other than the latest this process handled.
"""

from __future__ import annotations

import threading
from collections import OrderedDict


class HotBlocks:
    """Least-recently-used ``content hash -> [2, L, T, kv_heads, head_dim]`` KV, at most
    ``max_bytes`` of it (0 disables the cache). Safe to share between threads."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self._entries: OrderedDict[int, object] = OrderedDict()
        self._lock = threading.Lock()

    def get_many(self, keys: list[int]) -> dict[int, object]:
        """The cached KV of those ``keys`` that are present (they become most recent)."""
        out = {}
        with self._lock:
            for key in keys:
                kv = self._entries.get(key)
                if kv is not None:
                    self._entries.move_to_end(key)
                    out[key] = kv
        return out

    def put_many(self, items: dict[int, object]) -> None:
        """Cache ``key -> kv`` (replacing an older value), evicting the least recent beyond the bound."""
        if not self.max_bytes:
            return
        with self._lock:
            for key, kv in items.items():
                size = kv.numel() * kv.element_size()
                if size > self.max_bytes:
                    continue
                kv = _owning(kv, size)
                self._drop(key)
                self._entries[key] = kv
                self.bytes += size
            while self.bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))

    def discard(self, keys) -> None:
        """Forget ``keys`` (their stored value was rewritten)."""
        with self._lock:
            for key in keys:
                self._drop(key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, key: int) -> None:
        kv = self._entries.pop(key, None)
        if kv is not None:
            self.bytes -= kv.numel() * kv.element_size()


def _owning(kv, size: int):
    """``kv`` in memory of its own: a view of a larger buffer (a batch's transfer buffer)
    would keep all of it alive, beyond the bound."""
    return kv if kv.untyped_storage().nbytes() == size else kv.clone()
