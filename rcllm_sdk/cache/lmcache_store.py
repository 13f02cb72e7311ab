"""Block store on LMCache: the CPU tier of a ``StorageManager``, alone (``local://``) or in
front of a remote (``fs://``, ``lm://``, ``redis://``).

With a remote, the CPU tier is a process-local LRU copy of what this store wrote or read: a
value enters it only once the remote took it (so a dropped write is dropped everywhere), and
reads look there first. Faults of a server link trip a short circuit breaker: for ``retry_s``
seconds remote calls are skipped (and counted) instead of each paying the timeout again. An
``fs://`` directory has no link: a bad file is one key's fault, and a deleted directory is
created again on the next write.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from . import codec
from . import lmcache_compat as compat
from .base import FAULT, LOCAL, MISS, REMOTE, BlockStore, Read, check_key

_MISS, _FAILED = object(), object()  # per-key outcomes besides a tensor


@dataclass(slots=True)
class LMCacheOptions:
    """Options of the LMCache stores (``open_store(url, namespace, **options)``).

    Attributes:
        max_local_cpu_gb: size of the CPU tier; allocated (and touched) when the store opens.
        timeout_s: longest wait for one remote call (a batched call counts as one).
        retry_s: after a remote fault, remote calls are skipped for this long.
        tier_cache: keep what was written or read in the CPU tier (False: the tier is only
            the remote's I/O buffer; a cluster keeps one shared tier in front of its nodes).
    """

    max_local_cpu_gb: float = 0.5
    timeout_s: float = 2.0
    retry_s: float = 5.0
    tier_cache: bool = True

    def __post_init__(self):
        if not (self.max_local_cpu_gb > 0 and self.timeout_s > 0 and self.retry_s >= 0):
            raise ConfigError(f"LMCache store options must be positive (retry_s may be 0), got {self}")


class LMCacheStore(BlockStore):
    """A ``BlockStore`` on one LMCache ``StorageManager`` (one per store, so one per Redis node),
    optionally backed by a remote. ``close()`` must not race calls still in flight."""

    def __init__(self, url: str, namespace: str, remote_url: str | None, options: LMCacheOptions):
        super().__init__(url, namespace)
        self.options = options
        self._tag, self._mac_key = codec.namespace_tag(namespace), codec.mac_key_from_env()
        self._mgr = compat.Manager(options.max_local_cpu_gb)
        self._remote = compat.Remote(self._mgr, remote_url, options.timeout_s) if remote_url else None
        self.can_delete = self._remote is None or self._remote.can_delete
        self._down_until, self._down_kind, self._closed = 0.0, "", False
        self._reachable(0)  # connect now; a remote that is down only counts as down

    def put(self, key: int, kv: torch.Tensor) -> None:
        self.batched_put([(key, kv)])

    def get(self, key: int) -> torch.Tensor | None:
        return self.batched_get([key])[0]

    def contains(self, key: int) -> bool:
        return self.batched_contains([key])[0]

    def batched_put(self, items: Sequence[tuple[int, torch.Tensor]], placement=None) -> list[int]:
        latest = {check_key(key): kv for key, kv in items}  # a key repeated in one batch: the last wins
        for kv in latest.values():
            codec.check_tensor(kv)
        items = list(latest.items())
        if self._closed_fault(len(items)):
            return list(latest)
        keys, objs = self._encode(items)
        done = set()
        try:
            stored = [True] * len(keys)
            if self._remote is not None:
                stored = self._remote_results(self._remote.put_many, keys, objs)
            for key, obj, ok in zip(keys, objs, stored, strict=False):
                if ok is True:
                    if self.options.tier_cache or self._remote is None:
                        self._mgr.tier_put(key, obj)
                    self._count(puts=1, bytes_written=compat.blob(obj).numel() - codec.HEADER_BYTES)
                    done.add(key.chunk_hash)
        finally:
            compat.release(objs)
        return [key for key in latest if key not in done]

    def batched_get(self, keys: Sequence[int], placement=None) -> list[torch.Tensor | None]:
        return [read.value for read in self.batched_read(keys)]

    def batched_read(self, keys: Sequence[int], placement=None) -> list[Read]:
        ckeys = [self._key(k) for k in keys]
        if self._closed_fault(len(keys)):
            return [Read(None, FAULT)] * len(keys)
        out = [self._decode(k, ck, self._mgr.tier_get(ck)) for k, ck in zip(keys, ckeys, strict=False)]
        reads = [Read(kv, LOCAL) if isinstance(kv, torch.Tensor) else None for kv in out]
        todo = [i for i, kv in enumerate(out) if kv is _MISS]
        if todo and self._remote is not None:
            got = self._remote_results(self._remote.get_many, [ckeys[i] for i in todo])
            for i, obj in zip(todo, got, strict=False):
                out[i] = obj if obj is _FAILED else self._decode(keys[i], ckeys[i], obj, fetched=True)
                if isinstance(out[i], torch.Tensor):
                    reads[i] = Read(out[i], REMOTE, self.url)
        self._count(misses=sum(kv is _MISS for kv in out))
        return [
            read or Read(None, MISS if kv is _MISS else FAULT) for read, kv in zip(reads, out, strict=False)
        ]

    def batched_contains(self, keys: Sequence[int]) -> list[bool]:
        ckeys = [self._key(k) for k in keys]
        if self._closed_fault(len(keys)):
            return [False] * len(keys)
        out = [self._mgr.tier_contains(ck) for ck in ckeys]
        todo = [i for i, hit in enumerate(out) if not hit]
        if todo and self._remote is not None:
            for i, found in zip(
                todo, self._remote_results(self._remote.exists_many, [ckeys[i] for i in todo]), strict=False
            ):
                out[i] = found is True
        return out

    def delete(self, key: int) -> bool:
        ckey = self._key(key)
        if self._closed_fault(1):
            return False
        in_tier = self._mgr.tier_remove(ckey)
        if self._remote is None:
            return in_tier
        if not self._remote.can_delete:
            return False
        return bool(self._remote_call(lambda: self._remote.remove(ckey), 1, False))

    def close(self) -> None:
        """Close the remote link, then the StorageManager; each step waits at most timeout_s."""
        if self._closed:
            return
        self._closed = True
        steps = [self._remote.close] if self._remote else []
        for step in steps + [lambda: self._mgr.close(self.options.timeout_s)]:
            try:
                step()
            except Exception as e:  # noqa: BLE001 - close never raises
                self._fault("close failed", repr(e), 0)

    # -- helpers ---------------------------------------------------------------------------

    def _key(self, key: int):
        return self._mgr.key(self.namespace, check_key(key))

    def _encode(self, items):
        """LMCache keys and tier buffers holding the encoded blobs (what did not fit is counted)."""
        keys, objs = [], []
        for key, kv in items:
            obj = self._mgr.allocate(codec.blob_size(kv, self._mac_key))
            if obj is None:
                self._fault(
                    "local CPU tier full",
                    f"a {codec.blob_size(kv, self._mac_key)}-byte block does not fit "
                    f"max_local_cpu_gb={self.options.max_local_cpu_gb}",
                )
                continue
            codec.encode_into(compat.blob(obj), key, self._tag, kv, self._mac_key)
            keys.append(self._key(key))
            objs.append(obj)
        return keys, objs

    def _decode(self, key: int, ckey, obj, fetched: bool = False):
        """The tensor in one memory object (tier or remote; released here), ``_MISS`` for no
        object, ``_FAILED`` for a garbled one. Remote hits enter the tier."""
        if obj is None or obj is _FAILED:
            return _MISS if obj is None else _FAILED
        try:
            # the CPU tier holds only blobs encoded here or verified when fetched: no crc pass
            kv = codec.decode(compat.blob(obj), key, self._tag, check_crc=fetched, mac_key=self._mac_key)
            if kv is None:
                self._fault("corrupt value", f"key {key:#x} failed its header/crc/seal check")
                if not fetched:
                    self._mgr.tier_remove(ckey)
                return _FAILED
            self._count(hits=1, bytes_read=compat.blob(obj).numel() - codec.HEADER_BYTES)
            if fetched and self.options.tier_cache:
                self._mgr.tier_put(ckey, obj)
            return kv
        finally:
            obj.ref_count_down()

    def _remote_results(self, method, *args) -> list:
        """Per-key results of a remote call; keys that failed are counted and come back ``_FAILED``."""
        n = len(args[0])
        results = self._remote_call(lambda: method(*args), n, None) or [_FAILED] * n
        for res in results:
            if isinstance(res, BaseException):
                self._failed(res, 1)
        return [_FAILED if isinstance(r, BaseException) else r for r in results]

    def _remote_call(self, fn, n: int, default):
        if not self._reachable(n):
            return default
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - a remote fault never reaches the caller
            self._failed(e, n)
            return default

    def _failed(self, exc: BaseException, n: int) -> None:
        """Count a remote failure; a failed link also opens the circuit breaker for retry_s."""
        kind = compat.fault_kind(exc) if self._remote.link_faults else None
        self._remote.broken()
        if kind is not None:
            self._down_until, self._down_kind = time.monotonic() + self.options.retry_s, kind
        elif isinstance(exc, compat.TierFull):
            kind = "local CPU tier full"
        else:
            kind = "corrupt value" if isinstance(exc, compat.UnreadableValue) else "remote error"
        self._fault(kind, repr(exc), n)

    def _reachable(self, n: int) -> bool:
        if self._remote is None:
            return True
        if time.monotonic() < self._down_until:
            self._fault(self._down_kind, "skipped while the remote is down", n)
            return False
        try:
            self._remote.connect()
            return True
        except Exception as e:  # noqa: BLE001
            self._failed(e if compat.fault_kind(e) else ConnectionError(repr(e)), n)
            return False

    def _closed_fault(self, n: int) -> bool:
        if self._closed:
            self._fault("store closed", "called after close()", n)
        return self._closed
