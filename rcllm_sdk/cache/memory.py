"""In-process store for tests: encoded blobs in a dict, behind a lock.

``memory://`` is private to the store object; ``memory://NAME`` is a process-wide space that
every store opened with the same NAME shares (a stand-in for a server), namespaces kept apart.
"""
from __future__ import annotations

import threading

import torch

from . import codec
from .base import BlockStore, check_key

_SPACES: dict[str, dict[tuple[str, int], torch.Tensor]] = {}
_SPACES_LOCK = threading.Lock()


class MemoryStore(BlockStore):
    """A dict of ``(namespace, key) -> blob``; values round-trip through the same codec as
    every other backend, so a garbled blob is rejected here too."""

    def __init__(self, url: str, namespace: str, space: str = ""):
        super().__init__(url, namespace)
        self._tag = codec.namespace_tag(namespace)
        self._lock = threading.Lock()
        if space:
            with _SPACES_LOCK:
                self._blobs = _SPACES.setdefault(space, {})
        else:
            self._blobs = {}

    def put(self, key: int, kv: torch.Tensor) -> None:
        codec.check_tensor(kv)
        blob = codec.encode(check_key(key), self._tag, kv)
        with self._lock:
            self._blobs[(self.namespace, key)] = blob
        self._count(puts=1, bytes_written=blob.numel() - codec.HEADER_BYTES)

    def get(self, key: int) -> torch.Tensor | None:
        with self._lock:
            blob = self._blobs.get((self.namespace, check_key(key)))
        if blob is None:
            self._count(misses=1)
            return None
        kv = codec.decode(blob, key, self._tag)
        if kv is None:
            self._fault("corrupt value", f"key {key:#x} failed its header/crc check")
            return None
        self._count(hits=1, bytes_read=blob.numel() - codec.HEADER_BYTES)
        return kv

    def contains(self, key: int) -> bool:
        with self._lock:
            return (self.namespace, check_key(key)) in self._blobs

    def delete(self, key: int) -> bool:
        with self._lock:
            return self._blobs.pop((self.namespace, check_key(key)), None) is not None

    def close(self) -> None:
        self._blobs = {}  # detach: later calls see an empty store
