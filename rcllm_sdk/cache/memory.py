"""In-process store for tests: encoded blobs in a dict, behind a lock.

``memory://`` is private to the store object; ``memory://NAME`` is a process-wide space that
every store opened with the same NAME shares (a stand-in for a server, so its hits read as
``REMOTE``), namespaces kept apart. Setting ``store.down = True`` makes every call fail as a
server that is down would (fault-injection for tests).
"""

from __future__ import annotations

import threading

import torch

from . import codec
from .base import FAULT, LOCAL, MISS, REMOTE, BlockStore, Read, check_key

_SPACES: dict[str, dict[tuple[str, int], torch.Tensor]] = {}
_SPACES_LOCK = threading.Lock()


class MemoryStore(BlockStore):
    """A dict of ``(namespace, key) -> blob``; values round-trip through the same codec as
    every other backend, so a garbled blob is rejected here too."""

    def __init__(self, url: str, namespace: str, space: str = ""):
        super().__init__(url, namespace)
        self._tag, self._mac_key = codec.namespace_tag(namespace), codec.mac_key_from_env()
        self._lock = threading.Lock()
        self._hit_source = REMOTE if space else LOCAL
        self.down = False
        if space:
            with _SPACES_LOCK:
                self._blobs = _SPACES.setdefault(space, {})
        else:
            self._blobs = {}

    def put(self, key: int, kv: torch.Tensor) -> None:
        codec.check_tensor(kv)
        blob = codec.encode(check_key(key), self._tag, kv, self._mac_key)
        if self._is_down():
            return
        with self._lock:
            self._blobs[(self.namespace, key)] = blob
        self._count(puts=1, bytes_written=blob.numel() - codec.HEADER_BYTES)

    def get(self, key: int) -> torch.Tensor | None:
        return self.batched_read([key])[0].value

    def batched_read(self, keys, placement=None) -> list[Read]:
        return [self._read(check_key(key)) for key in keys]

    def _read(self, key: int) -> Read:
        if self._is_down():
            return Read(None, FAULT)
        with self._lock:
            blob = self._blobs.get((self.namespace, key))
        if blob is None:
            self._count(misses=1)
            return Read(None, MISS)
        kv = codec.decode(blob, key, self._tag, mac_key=self._mac_key)
        if kv is None:
            self._fault("corrupt value", f"key {key:#x} failed its header/crc check")
            return Read(None, FAULT)
        self._count(hits=1, bytes_read=blob.numel() - codec.HEADER_BYTES)
        return Read(kv, self._hit_source, self.url)

    def contains(self, key: int) -> bool:
        check_key(key)
        if self._is_down():
            return False
        with self._lock:
            return (self.namespace, key) in self._blobs

    def delete(self, key: int) -> bool:
        check_key(key)
        if self._is_down():
            return False
        with self._lock:
            return self._blobs.pop((self.namespace, key), None) is not None

    def corrupt(self, key: int, offset: int = -1) -> None:
        """Flip one payload byte of the stored value (tests: a node serving a bad block)."""
        with self._lock:
            self._blobs[(self.namespace, key)][offset] ^= 0x01

    def close(self) -> None:
        self._blobs = {}  # detach: later calls see an empty store

    def _is_down(self) -> bool:
        if self.down:
            self._fault("unreachable", "memory store marked down")
        return self.down
