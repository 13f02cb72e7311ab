"""Which storage shard holds an item's KV blocks: balanced similarity clusters or a stable hash.

Item blocks are sharded by embedding similarity so that a request's candidates (which tend to
be alike) touch few shards; user blocks are replicated on every node and never placed here.
Placement is a pure function of the item id and a :class:`ShardMap`, so every worker that holds
the same map (same ``map_id``) agrees on every item's home.

    >>> shard_map = similarity_placement(item_ids, embeddings, n_shards=8)   # embeddings [n, dim]
    >>> shard_map.shard_for(1193)
    >>> shard_map.save("shard_map.json"); ShardMap.load("shard_map.json").map_id == shard_map.map_id

Balance: every shard holds ``mean * (1 +/- slack)`` items (``mean = n / n_shards``), rounded
inward; see :func:`balance_bounds` for tiny shards. Numpy and scipy only: this module plans.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from types import MappingProxyType

import numpy as np
import scipy.sparse as sp

from ..errors import ConfigError

FORMAT = "rcllm-shard-map"
FORMAT_VERSION = 1
METHODS = ("similarity", "hash")
DEFAULT_SLACK = 0.10


def balance_bounds(n_items: int, n_shards: int, slack: float = DEFAULT_SLACK) -> tuple[int, int]:
    """``(low, high)``: the fewest and most items a shard may hold.

    Strictly within ``mean * (1 -/+ slack)`` (``mean = n / S``): ``low = ceil(mean * (1 - slack))``,
    ``high = floor(mean * (1 + slack))``, widened to ``floor(mean)`` / ``ceil(mean)`` when the
    band holds no feasible integer split (tiny shards: 10 items on 3 shards give ``(3, 4)``).
    The epsilon keeps ``40 / 4 * 1.1`` at 11.
    """
    mean = n_items / n_shards
    low = math.ceil(mean * (1 - slack) - 1e-9)
    high = math.floor(mean * (1 + slack) + 1e-9)
    return min(low, n_items // n_shards), max(high, -(-n_items // n_shards))


def hash_shard(item_id: int, n_shards: int) -> int:
    """Stable home of ``item_id``: blake2b of its 8-byte little-endian value, mod ``n_shards``.

    Never Python's ``hash`` (salted per process for str, and not a documented contract).
    """
    key = operator.index(item_id).to_bytes(8, "little", signed=True)
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % n_shards


@dataclass(frozen=True, eq=False)
class ShardMap:
    """An immutable assignment of items to ``n_shards`` shards; two maps are equal iff their ``map_id`` is.

    Attributes:
        method: ``"similarity"`` (explicit ``item_shard`` + ``centroids``) or ``"hash"`` (stateless).
        n_shards: number of shards (one storage node each).
        version: 1 for a new map, +1 on every change (:func:`add_items`, :func:`rebalance`).
        item_shard: item id -> shard, read-only; empty under hash placement.
        centroids: ``[n_shards, dim]`` float32 cluster centres (similarity only), read-only.
        slack: allowed relative deviation of a shard's size from the mean.
    """

    method: str
    n_shards: int
    version: int = 1
    item_shard: Mapping[int, int] = field(default_factory=dict)
    centroids: np.ndarray | None = None
    slack: float = DEFAULT_SLACK

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"placement method must be one of {METHODS}, got {self.method!r}")
        _check_shard_count(self.n_shards)
        object.__setattr__(self, "n_shards", int(self.n_shards))
        if not isinstance(self.version, int) or self.version < 1:
            raise ConfigError(f"shard map version must be an integer >= 1, got {self.version!r}")
        if not 0.0 <= self.slack < 1.0:
            raise ConfigError(f"slack must be in [0, 1), got {self.slack!r}")
        table = {int(i): int(s) for i, s in self.item_shard.items()}
        if table and not all(0 <= s < self.n_shards for s in table.values()):
            raise ConfigError(f"item_shard holds shards outside 0..{self.n_shards - 1}")
        object.__setattr__(self, "item_shard", MappingProxyType(table))
        object.__setattr__(self, "centroids", self._checked_centroids(table))

    def _checked_centroids(self, table: dict) -> np.ndarray | None:
        if self.method == "hash":
            if table or self.centroids is not None:
                raise ConfigError("a hash shard map holds no item_shard or centroids")
            return None
        c = None if self.centroids is None else np.array(self.centroids, np.float32)
        if c is None or c.ndim != 2 or c.shape[0] != self.n_shards or not np.isfinite(c).all():
            raise ConfigError(
                f"a similarity shard map needs finite centroids of shape [{self.n_shards}, dim]"
            )
        c.flags.writeable = False
        return c

    def shard_for(self, item_id: int) -> int:
        """Home shard of ``item_id``; a pure function of the id and this map.

        Under similarity placement the id is looked up; an id the map does not know (a new item
        not yet added) still has a deterministic home, :func:`hash_shard`, as under hash placement.
        """
        shard = self.item_shard.get(item_id)
        return hash_shard(item_id, self.n_shards) if shard is None else shard

    def sizes(self, item_ids=None) -> np.ndarray:
        """Items per shard, ``[n_shards]`` int64: of ``item_ids`` if given, else of the mapped items."""
        shards = (
            list(self.item_shard.values()) if item_ids is None else [self.shard_for(int(i)) for i in item_ids]
        )
        return np.bincount(np.asarray(shards, np.int64), minlength=self.n_shards)

    @cached_property
    def map_id(self) -> str:
        """16 hex digits over method, shard count, version, slack, assignment and centroids."""
        h = hashlib.blake2b(digest_size=8)
        h.update(json.dumps([FORMAT_VERSION, self.method, self.n_shards, self.version, self.slack]).encode())
        ids = np.array(sorted(self.item_shard), np.int64)
        h.update(ids.tobytes())
        h.update(np.array([self.item_shard[i] for i in ids.tolist()], np.int64).tobytes())
        if self.centroids is not None:
            h.update(np.ascontiguousarray(self.centroids).tobytes())
        return h.hexdigest()

    def __eq__(self, other) -> bool:
        return isinstance(other, ShardMap) and other.map_id == self.map_id

    def __hash__(self) -> int:
        return hash(self.map_id)

    def save(self, path: str | Path) -> None:
        """Write the map as JSON, atomically (temp file in the same folder, then ``os.replace``)."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self._to_json(), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> ShardMap:
        """Read a map written by :meth:`save`; a missing, corrupt or foreign file raises ConfigError."""
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read shard map {path}: {e}") from e
        if (
            not isinstance(doc, dict)
            or doc.get("format") != FORMAT
            or doc.get("format_version") != FORMAT_VERSION
        ):
            raise ConfigError(
                f"{path} is not a shard map of format {FORMAT!r} version {FORMAT_VERSION}; "
                "rebuild it with similarity_placement or hash_placement"
            )
        try:
            return cls._from_json(doc)
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise ConfigError(f"shard map {path} is malformed ({type(e).__name__}: {e}); rebuild it") from e

    def _to_json(self) -> dict:
        ids = sorted(self.item_shard)
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "n_shards": self.n_shards,
            "version": self.version,
            "slack": self.slack,
            "item_ids": ids,
            "shards": [self.item_shard[i] for i in ids],
            "centroids": None if self.centroids is None else self.centroids.tolist(),
        }

    @classmethod
    def _from_json(cls, doc: dict) -> ShardMap:
        table = dict(zip(doc["item_ids"], doc["shards"], strict=False))
        if not len(table) == len(doc["item_ids"]) == len(doc["shards"]):
            raise ConfigError("a shard map's item_ids must be unique and as many as its shards")
        centroids = None if doc["centroids"] is None else np.array(doc["centroids"], np.float32)
        return cls(doc["method"], doc["n_shards"], doc["version"], table, centroids, doc["slack"])


def shard_for(item_id: int, shard_map: ShardMap) -> int:
    """Home shard of ``item_id`` under ``shard_map`` (see :meth:`ShardMap.shard_for`)."""
    return shard_map.shard_for(item_id)


def hash_placement(item_ids, n_shards: int) -> ShardMap:
    """Stateless placement: every id goes to :func:`hash_shard`. ``item_ids`` only validates ``n_shards``."""
    _check_shard_count(n_shards, len(_checked_ids(item_ids)))
    return ShardMap("hash", n_shards)


def similarity_placement(
    item_ids, embeddings, n_shards: int, *, slack: float = DEFAULT_SLACK, seed: int = 0, iterations: int = 20
) -> ShardMap:
    """Balanced k-means: similar items share a shard, every shard within :func:`balance_bounds`.

    k-means++ seeds (from ``seed``) on the non-zero rows, then Lloyd iterations whose assignment
    step is capacity-constrained: nearest centroid, then the cheapest moves (smallest increase of
    squared distance) out of shards above ``high`` and into shards below ``low``. Items with a
    zero embedding (unseen in training) carry no similarity and are placed like any other row.
    Deterministic for a seed. Cost: ``O(iterations * n * S * dim)`` time and ``O(n * S)`` memory
    (measured on 2 shared CPU cores: ML-1M's 3.4k items x 32 dims under 0.2 s; 100k items, S=16, 3 s).

    Args:
        item_ids: ``[n]`` unique integer ids.
        embeddings: ``[n, dim]`` finite floats, row ``k`` belongs to ``item_ids[k]``.
        n_shards: 1 .. n.
        slack: allowed relative deviation of a shard's size from the mean, in [0, 1).

    Raises:
        ConfigError: bad shard count, mismatched shapes, duplicate ids, NaN/inf embeddings.

    Example:
        >>> m = similarity_placement([1, 2, 3, 4], np.eye(4, 2), n_shards=2)
    """
    ids, x = _checked_items(item_ids, embeddings)
    _check_shard_count(n_shards, len(ids))
    if not 0.0 <= slack < 1.0:
        raise ConfigError(f"slack must be in [0, 1), got {slack!r}")
    low, high = balance_bounds(len(ids), n_shards, slack)
    informative = np.abs(x).sum(axis=1) > 0  # zero rows (unseen items) do not move centroids
    centroids = _kmeans_plus_plus(
        x[informative] if informative.any() else x, n_shards, np.random.default_rng(seed)
    )
    shard_of = np.full(len(ids), -1)
    for _ in range(iterations):
        cost = _cost(x, centroids)
        new = _enforce_bounds(cost, cost.argmin(axis=1), low, high)
        if np.array_equal(new, shard_of):
            break
        shard_of, centroids = new, _centroids(x[informative], new[informative], centroids)
    table = dict(zip(ids.tolist(), shard_of.tolist(), strict=False))
    return ShardMap("similarity", n_shards, 1, table, centroids.astype(np.float32), slack)


def add_items(shard_map: ShardMap, item_ids, embeddings) -> ShardMap:
    """Place items the map does not know yet; already-placed ids keep their shard.

    Each new item goes to the nearest centroid whose shard has room (fewer than ``high`` items,
    with ``high`` from :func:`balance_bounds` of the total after adding); when a shard fills,
    the new items that lose least go elsewhere. The lower bound is :func:`rebalance`'s job.
    Returns ``shard_map`` itself when nothing is new, or under hash placement (stateless: every
    id already has its home); otherwise a map with ``version + 1``.
    """
    if shard_map.method == "hash":
        return shard_map
    ids, x = _checked_items(item_ids, embeddings, shard_map.centroids.shape[1])
    new = np.array([i not in shard_map.item_shard for i in ids.tolist()], bool)
    if not new.any():
        return shard_map
    S = shard_map.n_shards
    _, high = balance_bounds(len(shard_map.item_shard) + int(new.sum()), S, shard_map.slack)
    cost = _cost(x[new], shard_map.centroids)
    shard_of = cost.argmin(axis=1)
    room = np.maximum(high - shard_map.sizes(), 0)
    _drain_excess(cost, shard_of, np.bincount(shard_of, minlength=S), np.zeros(S, np.int64), room)
    table = {**shard_map.item_shard, **dict(zip(ids[new].tolist(), shard_of.tolist(), strict=False))}
    return replace(shard_map, version=shard_map.version + 1, item_shard=table)


def rebalance(shard_map: ShardMap, item_ids, embeddings) -> tuple[ShardMap, dict[int, tuple[int, int]]]:
    """Bring every shard within :func:`balance_bounds` with the fewest moves, cheapest first.

    ``item_ids``/``embeddings`` must cover exactly the map's items. Moves out of shards above
    ``high`` go first to shards below ``low``, so the count is ``max(total excess, total
    deficit)``, the minimum; no item moves twice. Centroids stay as they are.

    Returns:
        ``(new_map, moves)`` with ``moves[item_id] = (old_shard, new_shard)`` for moved items
        only. An already balanced map (and any hash map) comes back as itself with no moves.
    """
    if shard_map.method == "hash":
        return shard_map, {}
    ids, x = _checked_items(item_ids, embeddings, shard_map.centroids.shape[1])
    _check_covers(shard_map, ids)
    S = shard_map.n_shards
    before = np.array([shard_map.item_shard[i] for i in ids.tolist()], np.int64)
    low, high = balance_bounds(len(ids), S, shard_map.slack)
    after = _enforce_bounds(_cost(x, shard_map.centroids), before, low, high)
    moved = np.flatnonzero(after != before)
    if not len(moved):
        return shard_map, {}
    moves = {int(ids[k]): (int(before[k]), int(after[k])) for k in moved}
    table = {**shard_map.item_shard, **{i: new for i, (_, new) in moves.items()}}
    return replace(shard_map, version=shard_map.version + 1, item_shard=table), moves


# ---- validation ------------------------------------------------------------------------------
def _check_shard_count(n_shards, n_items: int | None = None) -> None:
    if isinstance(n_shards, bool) or not isinstance(n_shards, (int, np.integer)) or n_shards < 1:
        raise ConfigError(f"n_shards must be an integer >= 1, got {n_shards!r}")
    if n_items is not None and n_shards > n_items:
        raise ConfigError(f"n_shards={n_shards} is more than the {n_items} items to place; use fewer shards")


def _checked_ids(item_ids) -> np.ndarray:
    ids = np.asarray(item_ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ConfigError(
            f"item_ids must be a 1-D sequence of integers, got shape {ids.shape} dtype {ids.dtype}"
        )
    ids = ids.astype(np.int64)
    if len(np.unique(ids)) != len(ids):
        raise ConfigError("item_ids holds duplicates; each item is placed once")
    return ids


def _checked_items(item_ids, embeddings, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    ids = _checked_ids(item_ids)
    x = np.asarray(embeddings, np.float64)
    if x.ndim != 2 or x.shape[0] != len(ids):
        raise ConfigError(f"embeddings must be [n_items, dim] with n_items={len(ids)}, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ConfigError(f"embeddings have dim {x.shape[1]} but the shard map's centroids have dim {dim}")
    if not np.isfinite(x).all():
        raise ConfigError(
            f"embeddings hold {int((~np.isfinite(x)).any(axis=1).sum())} rows with NaN or inf; "
            "fix them or give unseen items a zero vector"
        )
    return ids, x


def _check_covers(shard_map: ShardMap, ids: np.ndarray) -> None:
    unknown = [i for i in ids.tolist() if i not in shard_map.item_shard]
    if unknown:
        raise ConfigError(
            f"{len(unknown)} item ids are not in the shard map (first: {unknown[0]}); "
            "place them with add_items before rebalancing"
        )
    if len(ids) != len(shard_map.item_shard):
        raise ConfigError(
            f"rebalance needs embeddings of all {len(shard_map.item_shard)} mapped items, got {len(ids)}"
        )


# ---- balanced k-means ------------------------------------------------------------------------
def _kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``[k, dim]`` seeds: each next one drawn with probability proportional to squared distance."""
    chosen = [int(rng.integers(len(x)))]
    d2 = ((x - x[chosen[0]]) ** 2).sum(axis=1)
    for _ in range(1, k):
        total = d2.sum()
        nxt = int(rng.choice(len(x), p=d2 / total)) if total > 0 else int(rng.integers(len(x)))
        chosen.append(nxt)
        d2 = np.minimum(d2, ((x - x[nxt]) ** 2).sum(axis=1))
    return x[chosen].copy()


def _cost(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """``[n, S]`` squared distance to each centroid, less the per-row constant ``|x|^2``."""
    c = np.asarray(centroids, np.float64)
    return (c * c).sum(axis=1)[None, :] - 2.0 * (x @ c.T)


def _centroids(x: np.ndarray, shard_of: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """Mean of each shard's rows; a shard without any keeps its previous centroid."""
    members = sp.csr_matrix((np.ones(len(x)), (shard_of, np.arange(len(x)))), shape=(len(previous), len(x)))
    counts = np.bincount(shard_of, minlength=len(previous))
    sums = members @ x  # [S, dim]
    return np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], previous)


def _enforce_bounds(cost: np.ndarray, shard_of: np.ndarray, low: int, high: int) -> np.ndarray:
    """Copy of ``shard_of`` with every shard size in ``[low, high]``, by the fewest, cheapest moves."""
    shard_of = shard_of.copy()
    S = cost.shape[1]
    sizes = np.bincount(shard_of, minlength=S)
    _drain_excess(cost, shard_of, sizes, np.full(S, low), np.full(S, high))
    while (deficit := low - sizes).max() > 0:
        _fill_shard(cost, shard_of, sizes, int(deficit.argmax()), low)
    return shard_of


def _drain_excess(cost, shard_of, sizes, low: np.ndarray, high: np.ndarray) -> None:
    """Move rows out of shards above ``high`` (per shard), in place; shards below ``low`` receive first."""
    while (excess := sizes - high).max() > 0:
        source = int(excess.argmax())
        room = low - sizes if (sizes < low).any() else high - sizes
        room = np.maximum(room, 0)
        room[source] = 0
        _move_out(cost, shard_of, sizes, source, int(excess[source]), room)


def _move_out(cost, shard_of, sizes, source: int, need: int, room: np.ndarray) -> None:
    """Move up to ``need`` rows of ``source`` to their cheapest open shard, smallest cost increase
    first; stops early when a destination fills (the caller recomputes where there is room)."""
    members = np.flatnonzero(shard_of == source)
    open_shards = np.flatnonzero(room > 0)
    options = cost[np.ix_(members, open_shards)]  # [m, open]
    best = options.argmin(axis=1)
    increase = options[np.arange(len(members)), best] - cost[members, source]
    for row in np.argsort(increase, kind="stable")[:need]:
        dest = int(open_shards[best[row]])
        shard_of[members[row]] = dest
        sizes[source] -= 1
        sizes[dest] += 1
        room[dest] -= 1
        if room[dest] == 0:
            return


def _fill_shard(cost, shard_of, sizes, target: int, low: int) -> None:
    """Pull the cheapest rows into ``target`` until it holds ``low``, never taking a donor below ``low``."""
    members = np.flatnonzero((sizes > low)[shard_of] & (shard_of != target))
    increase = cost[members, target] - cost[members, shard_of[members]]
    for row in np.argsort(increase, kind="stable"):
        if sizes[target] >= low:
            return
        source = shard_of[members[row]]
        if sizes[source] > low:
            shard_of[members[row]] = target
            sizes[source] -= 1
            sizes[target] += 1
