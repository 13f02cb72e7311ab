"""The SDK's window on Feast: create the repo, apply and materialize, read online features."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl

from ..cache.base import redact_url
from ..errors import FeatureRepoError
from .definitions import ITEM_FEATURES, ITEM_VIEW, USER_FEATURES, USER_VIEW, feature_definitions

STORE_YAML = """project: rcllm
registry: data/registry.db
provider: local
online_store:
{online}
offline_store:
  type: file
entity_key_serialization_version: 3
"""


def online_store_yaml(online_store: str) -> str:
    """``sqlite`` (embedded default) or ``redis://host:port[/db]`` as feature_store.yaml lines."""
    if online_store == "sqlite":
        return "  type: sqlite\n  path: data/online_store.db"
    scheme, sep, rest = online_store.partition("://")
    if sep and scheme.lower() == "redis":
        return f'  type: redis\n  connection_string: "{rest}"'
    raise FeatureRepoError(
        f"online store {redact_url(online_store)!r} is not supported; use sqlite or redis://host:port"
    )


def check_online_store(online_store: str, timeout_s: float = 2.0) -> None:
    """Raise FeatureRepoError unless the online store is supported and, for Redis, answers a ping."""
    online_store_yaml(online_store)  # refuses what is not supported
    if online_store == "sqlite":
        return
    import redis

    url = "redis://" + online_store.partition("://")[2]
    try:
        redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s).ping()
    except (redis.RedisError, OSError, ValueError) as exc:
        raise FeatureRepoError(
            f"online store {redact_url(online_store)} did not answer ({redact_url(exc)}); start it or "
            "check the URL — nothing in the repo was changed"
        ) from exc


def init_repo(repo: str | Path, online_store: str = "sqlite") -> Path:
    """Make ``repo`` a Feast repo (feature_store.yaml, data/, .feastignore); keeps an existing yaml."""
    repo = Path(repo)
    (repo / "data").mkdir(parents=True, exist_ok=True)
    yaml = repo / "feature_store.yaml"
    if not yaml.exists() or online_store != "sqlite":
        yaml.write_text(STORE_YAML.format(online=online_store_yaml(online_store)))
    ignore = repo / ".feastignore"
    if not ignore.exists():
        ignore.write_text("data/\n")
    return repo


class FeatureClient:
    """Reads user histories and item features through ``FeatureStore.get_online_features``."""

    def __init__(self, repo: str | Path):
        self.repo = Path(repo)
        if not (self.repo / "feature_store.yaml").exists():
            raise FeatureRepoError(
                f"{self.repo} has no feature_store.yaml: run `rcllm ingest --repo {self.repo}` first"
            )
        os.environ.setdefault("FEAST_USAGE", "False")
        from feast import FeatureStore  # lazy: slow import

        self.store = FeatureStore(repo_path=str(self.repo))

    def apply_and_materialize(self, user_history: pl.DataFrame, items: pl.DataFrame) -> None:
        """Write the offline parquet files, register the definitions and load the online store."""
        stamp = datetime.now(timezone.utc).replace(microsecond=0)
        data = self.repo / "data"
        for frame, name in ((user_history, "user_history"), (items, "items")):
            frame.with_columns(pl.lit(stamp).alias("event_timestamp")).write_parquet(data / f"{name}.parquet")
        self.store.apply(feature_definitions(data))
        self.store.materialize(stamp - timedelta(seconds=1), stamp + timedelta(seconds=1))

    def histories(self, user_ids: list[int]) -> list[tuple[list[int], list[int]] | None]:
        """``(item_ids, timestamps)`` per user, oldest first; ``None`` for a user the store lacks."""
        rows = self._read(USER_VIEW, USER_FEATURES, "user_id", user_ids)
        return [
            None if ids is None else (list(ids), list(ts or []))
            for ids, ts in zip(rows["item_ids"], rows["timestamps"], strict=False)
        ]

    def items(self, item_ids: list[int]) -> dict[str, list]:
        """Columns ``title, category, text, embedding`` for ``item_ids`` (``None`` where unknown)."""
        return self._read(ITEM_VIEW, ITEM_FEATURES, "item_id", item_ids)

    def _read(self, view: str, features: list[str], key: str, ids: list[int]) -> dict[str, list]:
        try:
            response = self.store.get_online_features(
                features=[f"{view}:{f}" for f in features], entity_rows=[{key: int(i)} for i in ids]
            )
        except Exception as exc:  # Feast raises many types for an unapplied or broken repo
            raise FeatureRepoError(
                f"{self.repo}: reading {view} failed ({exc}); run `rcllm ingest` first"
            ) from exc
        return response.to_dict()
