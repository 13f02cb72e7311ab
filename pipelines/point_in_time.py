"""Training histories from Feast's offline store, point in time.

Serving's ``user_history`` view holds one row per user (the history as ingested), which cannot say
what a user had seen at an earlier moment. This module keeps a second, offline-only Feast repo in
``<repo>/data/pipeline/offline`` whose view ``history_snapshots`` has one row per user and
interaction time: the items the user had interacted with up to then. ``get_historical_features``
with an entity row ``(user, t)`` then returns the newest snapshot strictly before ``t`` (the entity
time is moved back 1 µs; Feast joins ``<=``), so an example at ``t`` never sees an interaction at or
after ``t``, whatever order the rows arrive in. Interactions sharing one timestamp are all "at t".
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import polars as pl

OFFLINE = Path("data") / "pipeline" / "offline"
VIEW = "history_snapshots"
STORE_YAML = """project: rcllm_offline
registry: data/registry.db
provider: local
online_store:
  type: sqlite
  path: data/online_store.db
offline_store:
  type: file
entity_key_serialization_version: 3
"""


def snapshots(interactions: pl.DataFrame) -> pl.DataFrame:
    """One row per user and distinct timestamp: ``item_ids`` interacted with up to and including it."""
    ordered = interactions.sort(
        ["user_id", "timestamp", "position"]
        if "position" in interactions.columns
        else ["user_id", "timestamp"]
    )
    running = ordered.with_columns(pl.int_range(1, pl.len() + 1).over("user_id").alias("_seen"))
    ends = running.group_by(["user_id", "timestamp"]).agg(pl.col("_seen").max())
    lists = ordered.group_by("user_id", maintain_order=True).agg(pl.col("item_id").alias("_all"))
    return (
        ends.join(lists, on="user_id")
        .select(
            "user_id",
            pl.col("_all").list.head(pl.col("_seen")).alias("item_ids"),
            pl.from_epoch("timestamp", time_unit="s").dt.replace_time_zone("UTC").alias("event_timestamp"),
        )
        .sort(["user_id", "event_timestamp"])
    )


def offline_store(repo: Path, interactions: pl.DataFrame | None = None):
    """The offline Feast store of ``repo``'s snapshots, (re)written from ``interactions`` (default: the
    repo's ``interactions.parquet``) and applied."""
    from feast import Entity, FeatureStore, FeatureView, Field, FileSource, ValueType
    from feast.types import Array, Int64

    folder = Path(repo) / OFFLINE
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "feature_store.yaml").write_text(STORE_YAML)
    if interactions is None:
        interactions = pl.read_parquet(Path(repo) / "data" / "interactions.parquet")
    snapshots(interactions).write_parquet(folder / "data" / f"{VIEW}.parquet")
    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64)
    view = FeatureView(
        name=VIEW,
        entities=[user],
        ttl=timedelta(0),
        schema=[Field(name="item_ids", dtype=Array(Int64))],
        source=FileSource(path=f"data/{VIEW}.parquet", timestamp_field="event_timestamp"),
    )
    store = FeatureStore(repo_path=str(folder))
    store.apply([user, view])
    return store


def histories_before(store, users: list[int], times: list[int]) -> list[list[int]]:
    """Per ``(user, unix time)``: the user's items strictly before that time, oldest first, from the
    offline store (``[]`` when there are none)."""
    import pandas as pd

    entity = pd.DataFrame(
        {
            "user_id": users,
            "event_timestamp": pd.to_datetime(times, unit="s", utc=True) - pd.Timedelta(microseconds=1),
            "_row": range(len(users)),
        }
    )
    frame = store.get_historical_features(entity_df=entity, features=[f"{VIEW}:item_ids"]).to_df()
    # Feast's file store drops an entity row whose user has only later snapshots: no history yet.
    found = {row: ids for row, ids in zip(frame["_row"], frame["item_ids"], strict=True) if ids is not None}
    return [[int(i) for i in found.get(row, ())] for row in range(len(users))]
