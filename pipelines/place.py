"""Place the catalog's item blocks on storage shards (``rcllm place``): balanced clusters of the
item embeddings served by the Feast item view, written as a versioned shard map.

With an existing map file, new items join the nearest shard with room and a re-balance moves
only what must move; ``rcllm refresh --store cluster:///...`` then writes just the blocks of
moved and new items (the rest are already on their nodes).
"""

from __future__ import annotations

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
    moves, added = {}, 0
    if out.exists() and not new:
        old = ShardMap.load(out)
        if shards not in (None, old.n_shards):
            raise ConfigError(
                f"{out} has {old.n_shards} shards, not {shards}: pass --new to build a new map "
                "(every block then moves)"
            )
        grown = add_items(old, ids, embeddings)
        added = len(grown.item_shard) - len(old.item_shard)
        shard_map, moves = rebalance(grown, list(grown.item_shard) or ids, _rows(grown, ids, embeddings))
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
        "added": added,
        "moved": len(moves),
        "max_over_mean": float(sizes.max() / sizes.mean()),
        "min_over_mean": float(sizes.min() / sizes.mean()),
        "within_bounds": bool(low <= sizes.min() and sizes.max() <= high),
    }


def _rows(shard_map: ShardMap, ids: list[int], embeddings: np.ndarray) -> np.ndarray:
    """Embeddings in the order of the map's items (rebalance wants exactly those)."""
    if not shard_map.item_shard:
        return embeddings
    row = {item: i for i, item in enumerate(ids)}
    unknown = [i for i in shard_map.item_shard if i not in row]
    if unknown:
        raise FeatureRepoError(
            f"the shard map places {len(unknown)} items the catalog no longer has "
            f"(e.g. {unknown[:5]}); build a new map with --new"
        )
    return embeddings[[row[i] for i in shard_map.item_shard]]
