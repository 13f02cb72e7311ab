"""Feast objects of the feature repo: entities ``user`` and ``item`` and their two views.

``feature_repo/features.py`` calls :func:`feature_definitions` so that the ``feast`` CLI sees the
same objects the SDK applies.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

USER_VIEW, ITEM_VIEW = "user_history", "item_features"
USER_FEATURES = ["item_ids", "timestamps"]
ITEM_FEATURES = ["title", "category", "text", "embedding"]


def feature_definitions(data_dir: str | Path = "data") -> list:
    """Entities and feature views reading the parquet files that ``rcllm ingest`` writes.

    The default, a path relative to the repo (Feast resolves it against ``repo_path``), keeps the
    registry valid when ``rcllm ingest`` builds the repo in a staging folder and moves it in place.
    """
    from feast import Entity, FeatureView, Field, FileSource, ValueType  # lazy: `import feast` takes ~5 s
    from feast.types import Array, Float32, Int64, String

    data_dir = Path(data_dir)
    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64)
    item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64)
    history = FeatureView(
        name=USER_VIEW,
        entities=[user],
        ttl=timedelta(0),
        schema=[Field(name="item_ids", dtype=Array(Int64)), Field(name="timestamps", dtype=Array(Int64))],
        source=FileSource(path=str(data_dir / "user_history.parquet"), timestamp_field="event_timestamp"),
    )
    items = FeatureView(
        name=ITEM_VIEW,
        entities=[item],
        ttl=timedelta(0),
        schema=[
            Field(name="title", dtype=String),
            Field(name="category", dtype=String),
            Field(name="text", dtype=String),
            Field(name="embedding", dtype=Array(Float32)),
        ],
        source=FileSource(path=str(data_dir / "items.parquet"), timestamp_field="event_timestamp"),
    )
    return [user, item, history, items]
