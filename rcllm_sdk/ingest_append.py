"""``rcllm ingest --append``: new interactions (and new or changed items) added to an ingested repo.

The new rows join the ones already ingested (repeats of a user-item pair keep the first), the
leave-one-out split and the retriever are recomputed over the union, and the repo's files are
replaced all at once as by :func:`rcllm_sdk.ingest.ingest` (staging folder, then one commit), so
serving reads the old repo or the new one, never a mix. The settings of the first ingest (embedding
size, retriever blend, online store) are kept. Models, KV blocks and pipeline state are not touched:
``rcllm pipeline run`` then trains on the new data (its cut-off moved).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from .data.sources import Dataset, checked_dataset, load
from .errors import ConfigError
from .ingest import IngestResult, ingest_dataset, read_manifest
from .retrieval import RetrieverConfig

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
ITEM_COLUMNS = ("item_id", "title", "category", "text")


def append_source(
    repo: str | Path, source: str, path: str | Path | None, skip_bad_rows: bool = False
) -> IngestResult:
    """Append what ``source`` (``csv`` or ``movielens`` at ``path``) holds to the ingested ``repo``.
    Its items file may list only new or changed items; items it omits keep their ingested features."""
    if source == "synthetic":
        raise ConfigError("--append takes the new rows from files: use --source csv or movielens with --path")
    new = load(source, path, skip_bad_rows=skip_bad_rows)
    return append_interactions(repo, new.interactions, new.items, new.skipped)


def append_interactions(
    repo: str | Path,
    interactions: pl.DataFrame,
    items: pl.DataFrame | None = None,
    skipped: dict | None = None,
) -> IngestResult:
    """Add ``interactions`` (``user_id, item_id, timestamp``) and ``items`` (new or changed rows of
    ``item_id, title, category, text``) to ``repo`` and re-commit it.

    Raises:
        FeatureRepoError: ``repo`` was never ingested.
        DataFormatError: an interaction names an item that is neither ingested nor in ``items``.
    """
    repo = Path(repo)
    manifest = read_manifest(repo)
    data = repo / "data"
    old_items = pl.read_parquet(data / "items.parquet", columns=list(ITEM_COLUMNS))
    if items is not None and items.height:
        changed = items.select(list(ITEM_COLUMNS)).cast(old_items.schema)
        old_items = pl.concat([old_items.join(changed, on="item_id", how="anti"), changed]).sort("item_id")
    old = pl.read_parquet(data / "interactions.parquet", columns=list(INTERACTION_COLUMNS))
    merged = pl.concat([old, interactions.select(list(INTERACTION_COLUMNS)).cast(old.schema)])
    dataset = checked_dataset(manifest["dataset"], merged, old_items, dict(skipped or {}))
    return _commit(repo, dataset, manifest)


def _commit(repo: Path, dataset: Dataset, manifest: dict) -> IngestResult:
    """The ingest of ``dataset`` into ``repo`` with the repo's own settings; ``sqlite`` keeps the
    repo's feature_store.yaml (a Redis repo gets its next namespace)."""
    retriever = RetrieverConfig(**manifest["retriever"])
    return ingest_dataset(dataset, repo, "sqlite", manifest["embedding"]["dim"], retriever)
