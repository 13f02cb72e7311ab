"""The SDK's window on Feast: create the repo, apply and materialize, read online features."""

from __future__ import annotations

import os
import re
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from ..cache.base import redact_url
from ..errors import FeatureRepoError
from .definitions import ITEM_FEATURES, ITEM_VIEW, USER_FEATURES, USER_VIEW, feature_definitions

if TYPE_CHECKING:
    import polars as pl

STORE_YAML = """project: {project}
registry: data/registry.db
provider: local
online_store:
{online}
offline_store:
  type: file
entity_key_serialization_version: 3
"""


PASSWORD_ENV = "RCLLM_ONLINE_STORE_PASSWORD"  # feature_store.yaml names it; Feast substitutes it at load


def online_store_yaml(online_store: str) -> str:
    """``sqlite`` (embedded default) or ``redis://[user:password@]host:port[/db]`` as
    feature_store.yaml lines. A password is never written: the yaml reads it from
    ``$RCLLM_ONLINE_STORE_PASSWORD`` (Feast's ``${VAR}`` substitution)."""
    if online_store == "sqlite":
        return "  type: sqlite\n  path: data/online_store.db"
    scheme, sep, rest = online_store.partition("://")
    if sep and scheme.lower() in ("redis", "rediss"):
        return f'  type: redis\n  connection_string: "{_feast_redis_connection(scheme.lower(), rest)}"'
    raise FeatureRepoError(
        f"online store {redact_url(online_store)!r} is not supported; use sqlite or redis://host:port"
    )


def online_store_password(online_store: str) -> str | None:
    """The password a ``redis://`` online-store URL holds (None when it holds none)."""
    credentials, at, _ = online_store.partition("://")[2].rpartition("@")
    return credentials.partition(":")[2] or None if at else None


def _feast_redis_connection(scheme: str, rest: str) -> str:
    """Feast's ``host:port,key=value`` form of a Redis URL's part after ``scheme://``."""
    credentials, _, address = rest.rpartition("@")
    host_port, _, db = address.partition("/")
    username, _, password = credentials.partition(":")
    if "," in host_port or "," in username or "," in password:
        raise FeatureRepoError("a Redis online-store URL cannot hold ',' (Feast splits its options on it)")
    options = [host_port]
    if db:
        options.append(f"db={db}")
    if username:
        options.append(f"username={username}")
    if password:
        options.append(f"password=${{{PASSWORD_ENV}}}")
    if scheme == "rediss":
        options.append("ssl=true")
    return ",".join(options)


def check_online_store(online_store: str, timeout_s: float = 2.0) -> None:
    """Raise FeatureRepoError unless the online store is supported and, for Redis, answers a ping."""
    online_store_yaml(online_store)  # refuses what is not supported
    if online_store == "sqlite":
        return
    import redis

    scheme, _, rest = online_store.partition("://")
    url = f"{scheme.lower()}://{rest}"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s).ping()
    except (redis.RedisError, OSError, ValueError) as exc:
        raise FeatureRepoError(
            f"online store {redact_url(online_store)} did not answer ({redact_url(exc)}); start it or "
            "check the URL — nothing in the repo was changed"
        ) from exc


def init_repo(repo: str | Path, online_store: str = "sqlite", keep_yaml_from: Path | None = None) -> Path:
    """Make ``repo`` a Feast repo (feature_store.yaml, data/, .feastignore).

    A SQLite repo keeps the feature_store.yaml of ``keep_yaml_from`` (default: ``repo`` itself)
    when there is one. A Redis online store gets a new Feast project per call, so the keys of
    the ingest being built never overwrite those of the one serving.
    """
    repo = Path(repo)
    (repo / "data").mkdir(parents=True, exist_ok=True)
    yaml, kept = repo / "feature_store.yaml", Path(keep_yaml_from or repo) / "feature_store.yaml"
    if online_store == "sqlite" and kept.exists():
        text = kept.read_text()
        if "type: redis" in text:  # the repo serves from Redis: build the new keys in a new namespace
            text = re.sub(r"(?m)^project:.*$", f"project: {_new_project()}", text)
        yaml.write_text(text)
    else:
        project = "rcllm" if online_store == "sqlite" else _new_project()
        yaml.write_text(STORE_YAML.format(project=project, online=online_store_yaml(online_store)))
    ignore = repo / ".feastignore"
    if not ignore.exists():
        ignore.write_text("data/\n")
    return repo


def _new_project() -> str:
    return f"rcllm_{time.time_ns():x}"


class FeatureClient:
    """Reads user histories and item features through ``FeatureStore.get_online_features``."""

    def __init__(self, repo: str | Path):
        self.repo = Path(repo)
        if not (self.repo / "feature_store.yaml").exists():
            raise FeatureRepoError(
                f"{self.repo} has no feature_store.yaml: run `rcllm ingest --repo {self.repo}` first"
            )
        if f"${{{PASSWORD_ENV}}}" in (self.repo / "feature_store.yaml").read_text() and not os.environ.get(
            PASSWORD_ENV
        ):
            raise FeatureRepoError(
                f"{self.repo}'s Redis online store needs its password: export {PASSWORD_ENV} "
                "(it is never written into feature_store.yaml)"
            )
        os.environ.setdefault("FEAST_USAGE", "False")
        from feast import FeatureStore  # lazy: slow import

        self.store = FeatureStore(repo_path=str(self.repo))

    def apply_and_materialize(self, user_history: pl.DataFrame, items: pl.DataFrame) -> None:
        """Write the offline parquet files, register the definitions and load the online store."""
        import polars as pl  # lazy: serving reads through Feast and needs no polars

        stamp = datetime.now(timezone.utc).replace(microsecond=0)
        data = self.repo / "data"
        for frame, name in ((user_history, "user_history"), (items, "items")):
            frame.with_columns(pl.lit(stamp).alias("event_timestamp")).write_parquet(data / f"{name}.parquet")
        self.store.apply(feature_definitions())
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
