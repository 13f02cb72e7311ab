"""Keep a ``cluster://`` store's shard map in step with the catalog before blocks are written.

``cluster.json`` names its map file (``"shard_map"``, relative to the file). When the ingested
item set is no longer the map's (``rcllm ingest --append`` added items, a re-ingest removed some),
the map is updated as ``rcllm place`` updates one (:func:`pipelines.place.update_map`: new items
on the nearest shard with room, then a re-balance with the fewest moves) and replaced atomically
(temporary file beside it, then ``os.replace``). The refresh that follows writes the blocks of new
and moved items to their new shards: a block is written wherever its shard's node lacks it.

A cluster store reads its map when it opens: a server picks the new map up when it opens its
store again (a restart, or ``reload()`` to a new model version). Until then it reads new items at
their hash home (misses, recomputed) and moved items on their old shard, which keeps its copy.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

from rcllm_sdk.errors import ConfigError


def shard_map_file(store: str) -> Path | None:
    """The shard map file of a ``cluster:///abs/cluster.json`` store; None for any other store and
    for a cluster without one (hash placement: nothing to keep in step)."""
    parts = urlsplit(store)
    if parts.scheme.lower() != "cluster" or not parts.path:
        return None
    config = Path(parts.path)
    try:
        entry = json.loads(config.read_text()).get("shard_map")
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"cannot read cluster configuration {config}: {exc}") from exc
    return config.parent / entry if isinstance(entry, str) else None


def place_catalog(repo: str | Path, store: str) -> dict:
    """Update ``store``'s shard map to the repo's item set when it changed, and record it in the
    active MLflow run (metrics ``shard_map_added``, ``shard_map_dropped``, ``shard_map_moved``,
    ``shard_map_version``; tag ``rcllm.shard_map_id``; ``placement/moves.json``: item -> [old
    shard, new shard]). Returns those figures; ``{}`` when the store has no shard map."""
    import mlflow

    from rcllm_sdk.cache.placement import ShardMap

    from .place import item_embeddings, update_map

    path = shard_map_file(store)
    if path is None:
        return {}
    old = ShardMap.load(path)
    ids, embeddings = item_embeddings(Path(repo))
    shard_map, change = update_map(old, ids, embeddings)
    if shard_map is not old:
        shard_map.save(path)
    figures = {
        "shard_map_added": change["added"],
        "shard_map_dropped": change["dropped"],
        "shard_map_moved": len(change["moves"]),
        "shard_map_version": shard_map.version,
    }
    mlflow.log_metrics(figures)
    mlflow.set_tag("rcllm.shard_map_id", shard_map.map_id)
    if change["moves"]:
        moves = {str(item): list(shards) for item, shards in sorted(change["moves"].items())}
        mlflow.log_dict(moves, "placement/moves.json")
    return {**figures, "shard_map_id": shard_map.map_id}
