"""Place the catalog's item blocks on storage shards (``rcllm place``): balanced clusters of the
item embeddings served by the Feast item view, written as a versioned shard map.

With an existing map file, items the catalog no longer has leave it, new items join the nearest
shard with room and a re-balance moves only what must move (:func:`update_map`, which the
pipeline's refresh also runs); ``rcllm refresh --store cluster:///...`` then writes just the
blocks of moved and new items (the rest are already on their nodes).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl

from rcllm_sdk.cache.placement import (
    ShardMap,
    add_items,
    balance_bounds,
    hash_placement,
    rebalance,
    similarity_placement,
)
from rcllm_sdk.errors import ConfigError, FeatureRepoError
from rcllm_sdk.features.store import FeatureClient


def item_embeddings(repo: Path) -> tuple[list[int], np.ndarray]:
    """Every item id of the repo and its embedding, read through the Feast item view."""
    table = repo / "data" / "items.parquet"
    if not table.exists():
        raise FeatureRepoError(f"{table} does not exist: run `rcllm ingest --repo {repo}` first")
    ids = pl.read_parquet(table, columns=["item_id"])["item_id"].to_list()
    served = FeatureClient(repo).items(ids)["embedding"]
    missing = [i for i, e in zip(ids, served, strict=False) if e is None]
    if missing:
        raise FeatureRepoError(
            f"the Feast item view has no embedding for {len(missing)} items "
            f"(e.g. {missing[:5]}): re-run `rcllm ingest`"
        )
    return ids, np.asarray(served, np.float32)


def place_repo(
    repo: str | Path,
    out: str | Path,
    shards: int | None = None,
    method: str = "similarity",
    new: bool = False,
) -> dict:
    """Write the shard map for the repo's catalog to ``out`` (updating the map there unless
    ``new``; ``shards`` defaults to 8 for a new map, to the existing map's count otherwise)."""
    repo, out = Path(repo), Path(out)
    ids, embeddings = item_embeddings(repo)
    change = {"added": 0, "dropped": 0, "moves": {}}
    if out.exists() and not new:
        old = ShardMap.load(out)
        if shards not in (None, old.n_shards):
            raise ConfigError(
                f"{out} has {old.n_shards} shards, not {shards}: pass --new to build a new map "
                "(every block then moves)"
            )
        shard_map, change = update_map(old, ids, embeddings)
    elif method == "hash":
        shard_map = hash_placement(ids, shards or 8)
    else:
        shard_map = similarity_placement(ids, embeddings, shards or 8)
    shard_map.save(out)
    sizes = shard_map.sizes(ids)
    low, high = balance_bounds(len(ids), shard_map.n_shards, shard_map.slack)
    return {
        "out": str(out),
        "method": shard_map.method,
        "shards": shard_map.n_shards,
        "items": len(ids),
        "version": shard_map.version,
        "map_id": shard_map.map_id,
        "added": change["added"],
        "dropped": change["dropped"],
        "moved": len(change["moves"]),
        "max_over_mean": float(sizes.max() / sizes.mean()),
        "min_over_mean": float(sizes.min() / sizes.mean()),
        "within_bounds": bool(low <= sizes.min() and sizes.max() <= high),
    }


def update_map(old: ShardMap, ids: list[int], embeddings: np.ndarray) -> tuple[ShardMap, dict]:
    """``old`` brought to the catalog ``ids``: items it no longer has dropped, new items placed on
    the nearest shard with room, then a re-balance with the fewest moves; one version up.

    Every ingest recomputes the item embeddings, so the centroids are first re-derived from the
    current embeddings of each shard's items (their assignment kept): new items are compared with
    centroids of the same embedding space. Returns the map (``old`` itself when the item set is
    unchanged, or under hash placement) and ``{"added": n, "dropped": n, "moves": {item: (old,
    new)}}``.
    """
    change = {"added": 0, "dropped": 0, "moves": {}}
    catalog, known = set(ids), set(old.item_shard)
    if old.method == "hash" or catalog == known:
        return old, change
    kept = {item: shard for item, shard in old.item_shard.items() if item in catalog}
    base = replace(old, item_shard=kept, centroids=_current_centroids(old, kept, ids, embeddings))
    grown = add_items(base, ids, embeddings)
    shard_map, moves = rebalance(grown, list(grown.item_shard), _rows(grown, ids, embeddings))
    change.update(added=len(catalog - known), dropped=len(known - catalog), moves=moves)
    return replace(shard_map, version=old.version + 1), change


def _current_centroids(old: ShardMap, kept: dict, ids: list[int], embeddings: np.ndarray) -> np.ndarray:
    """Each shard's mean current embedding over its kept items with a non-zero embedding (unseen
    items carry no similarity); a shard without any keeps its old centroid."""
    if not kept:
        return old.centroids
    row = {item: k for k, item in enumerate(ids)}
    x = np.asarray(embeddings, np.float64)[[row[i] for i in kept]]
    shards = np.fromiter(kept.values(), np.int64, len(kept))
    informative = np.abs(x).sum(axis=1) > 0
    sums = np.zeros((old.n_shards, x.shape[1]))
    np.add.at(sums, shards[informative], x[informative])
    counts = np.bincount(shards[informative], minlength=old.n_shards)[:, None]
    return np.where(counts > 0, sums / np.maximum(counts, 1), old.centroids).astype(np.float32)


def _rows(shard_map: ShardMap, ids: list[int], embeddings: np.ndarray) -> np.ndarray:
    """Embeddings in the order of the map's items (rebalance wants exactly those)."""
    row = {item: i for i, item in enumerate(ids)}
    return embeddings[[row[i] for i in shard_map.item_shard]]
