"""The block store protocol: per-block KV tensors under 64-bit content-hash keys.

Semantics every backend keeps (the contract suite in tests/test_store.py checks them):

* ``get`` returns exactly the shape, dtype and bits that were ``put``, or None.
* Overwrite: the last ``put`` of a key wins, as seen by the store that wrote it. Keys are
  content hashes, so every writer of one key writes the same bits; a process-local copy
  (LMCache CPU tier) may keep serving an older value written by another process.
* Faults never reach the caller: a backend that is down, refuses or times out makes ``get``
  return None, ``put`` drop the write and ``contains``/``delete`` return False. Each failed
  key counts in ``stats.errors``; the first failure of each kind is logged as a warning on
  the ``rcllm_sdk.cache`` logger, later ones are only counted.
* ``close`` never hangs; a store is also a context manager.
* ``placement`` (optional, per key): the item id of an item block, None for anything else.
  Single-location stores ignore it; a cluster stores item blocks on their shard's node(s)
  and everything else on every node.
"""

from __future__ import annotations

import logging
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..errors import InvariantError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("rcllm_sdk.cache")

MAX_KEY = 2**64

# Where a read came from (``BlockStore.batched_read``).
LOCAL, REMOTE, MISS, FAULT = "local", "remote", "miss", "fault"


@dataclass(frozen=True, slots=True)
class Read:
    """One key's read: the value (None unless a hit), where it came from (``LOCAL``: this
    process's memory; ``REMOTE``: a server, ``node`` names it; ``MISS``; ``FAULT``: the backend
    failed or the value was garbled) and its tensor bytes."""

    value: torch.Tensor | None
    source: str
    node: str = ""

    @property
    def nbytes(self) -> int:
        return 0 if self.value is None else self.value.numel() * self.value.element_size()


@dataclass(slots=True)
class StoreStats:
    """Cumulative counters of one store (a snapshot; bytes are tensor bytes, headers excluded).

    Attributes:
        puts: keys written.
        hits: keys read back.
        misses: keys read that the store did not hold.
        errors: keys (or calls) that failed: backend down, timed out, garbled value, full.
    """

    puts: int = 0
    hits: int = 0
    misses: int = 0
    errors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


class BlockStore(ABC):
    """Per-block KV storage. Subclasses implement the four single-key operations (and may
    override the batched ones); the base keeps the counters and the once-per-kind warnings.

    Example:
        >>> import torch
        >>> from rcllm_sdk.cache import open_store
        >>> with open_store("memory://", namespace="0123456789abcdef") as store:
        ...     store.put(42, torch.zeros(2, 4, 3, 8))   # [2, L, T, W]
        ...     store.get(42).shape
        torch.Size([2, 4, 3, 8])
    """

    can_delete = True  # False where the backend's protocol has no delete (lm://)

    def __init__(self, url: str, namespace: str):
        self.url, self.namespace = redact_url(url), namespace
        self._stats = StoreStats()
        self._stats_lock = threading.Lock()
        self._logged: set[str] = set()

    @abstractmethod
    def put(self, key: int, kv: torch.Tensor) -> None:
        """Store ``kv`` (``[2, L, T, W]`` float32/float16/bfloat16) under ``key``."""

    @abstractmethod
    def get(self, key: int) -> torch.Tensor | None:
        """The tensor stored under ``key`` (a fresh CPU tensor), or None."""

    @abstractmethod
    def contains(self, key: int) -> bool:
        """Whether ``key`` is stored (False when the backend cannot be asked)."""

    @abstractmethod
    def delete(self, key: int) -> bool:
        """Remove ``key``; True if it was stored and is now gone."""

    def batched_put(
        self, items: Sequence[tuple[int, torch.Tensor]], placement: Sequence[int | None] | None = None
    ) -> list[int]:
        """Store every ``(key, kv)``; returns the keys that could not be stored (faults)."""
        failed = []
        for key, kv in items:
            errors = self.stats.errors
            self.put(key, kv)
            if self.stats.errors != errors:
                failed.append(key)
        return failed

    def batched_get(
        self, keys: Sequence[int], placement: Sequence[int | None] | None = None
    ) -> list[torch.Tensor | None]:
        return [self.get(key) for key in keys]

    def batched_read(self, keys: Sequence[int], placement: Sequence[int | None] | None = None) -> list[Read]:
        """``batched_get`` that also says where each value came from (per-request cache stats)."""
        return [Read(kv, LOCAL) if kv is not None else Read(None, MISS) for kv in self.batched_get(keys)]

    def batched_contains(self, keys: Sequence[int]) -> list[bool]:
        return [self.contains(key) for key in keys]

    def batched_stored(
        self, keys: Sequence[int], placement: Sequence[int | None] | None = None
    ) -> list[bool]:
        """Whether every copy the store keeps of each key is in place (a cluster: on all the
        key's nodes). What a refresh checks before skipping a block."""
        return self.batched_contains(keys)

    def close(self) -> None:  # noqa: B027 - a default no-op: stores holding nothing need no close
        """Release the backend; never hangs. Later calls behave as if the backend were down."""

    @property
    def stats(self) -> StoreStats:
        with self._stats_lock:
            return replace(self._stats)

    def __enter__(self) -> BlockStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, namespace={self.namespace!r})"

    # -- bookkeeping for subclasses --------------------------------------------------------

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, delta in deltas.items():
                setattr(self._stats, name, getattr(self._stats, name) + delta)

    def _fault(self, kind: str, detail: object, n: int = 1) -> None:
        """Count ``n`` failed keys; warn the first time this store sees ``kind``."""
        self._count(errors=n)
        with self._stats_lock:
            first = kind not in self._logged
            self._logged.add(kind)
        if first:
            logger.warning(
                "KV store %s (namespace %s): %s: %s; further %s failures are only counted in stats.errors",
                self.url,
                self.namespace,
                kind,
                redact_url(detail),  # exception texts may quote the URL, password included
                kind,
            )


# A scheme in any case, then everything up to the last "@" before whitespace or a quote: a
# password may itself hold "/", "@" or ":" (redis-py accepts them unescaped).
_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^\s'\"]*@")


def redact_url(text: str) -> str:
    """``text`` (a URL, a message, an exception's text) with the ``user:password@`` part of every
    URL in it replaced by ``***@``. The one redaction the SDK applies to what it prints or logs."""
    return _CREDENTIALS.sub(r"\g<scheme>***@", str(text))


def check_key(key: int) -> int:
    """Keys are unsigned 64-bit content hashes."""
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < MAX_KEY:
        raise InvariantError(f"a block key must be an int in [0, 2**64), got {key!r}")
    return key
