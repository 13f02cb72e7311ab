"""Refresh the block KV cache of an ingested repo (``rcllm refresh``): every item block and
the history blocks of the active users, computed by the serving model into the serving store."""

from __future__ import annotations

import logging
from pathlib import Path

import polars as pl

from rcllm_sdk.prompt.encoder import cacheable_blocks
from rcllm_sdk.recommender import RcRecommender
from rcllm_sdk.runtime.refresh import refresh_blocks

from .run import catalog_from_repo

log = logging.getLogger("rcllm_sdk.pipelines")


def active_histories(repo: Path, active_days: float | None) -> list[list[int]]:
    """Histories Feast serves (``user_history.parquet``); with ``active_days``, only users whose
    last interaction is that recent relative to the newest one in the data."""
    table = pl.read_parquet(repo / "data" / "user_history.parquet", columns=["item_ids", "timestamps"])
    table = table.filter(pl.col("item_ids").list.len() > 0)
    if active_days is not None:
        last = table["timestamps"].list.max()
        table = table.filter(last >= last.max() - active_days * 86400)
    return [list(ids) for ids in table["item_ids"]]


def refresh_repo(
    repo: str | Path,
    model: str | Path | None = None,
    store: str = "local://",
    active_days: float | None = None,
    force: bool = False,
    progress: bool = True,
    device: str | None = None,
    dtype: str | None = None,
    log_mlflow: bool = True,
) -> dict:
    """Precompute item and active-user blocks into ``store`` with the ranker on ``device`` in
    ``dtype`` (None: the ``RecommenderConfig`` default); returns the refresh figures (also logged as
    an ``rcllm-refresh`` MLflow run with a figure, unless ``log_mlflow`` is False)."""
    repo = Path(repo)
    if store.startswith(("local://", "memory://")):
        log.warning(
            "store %s lives in this process only: the refreshed blocks vanish when it exits; "
            "use fs://, lm:// or redis:// for a cache that serving processes share",
            store,
        )
    with RcRecommender.from_feature_store(
        repo, model=model, mode="rcllm", store=store, device=device, dtype=dtype
    ) as rec:
        catalog, template = catalog_from_repo(repo), rec.ranker.template
        histories = [
            [catalog[i] for i in h[-template.max_history :]] for h in active_histories(repo, active_days)
        ]
        blocks = cacheable_blocks(
            histories, list(catalog.values()), template, rec.ranker.tokenizer, rec.ranker.fingerprint
        )
        figures = refresh_blocks(rec.engine, blocks, force=force, progress=progress)
    figures = {**figures, "users": len(histories), "items": len(catalog), "store": store}
    if log_mlflow:
        from rcllm_sdk.evaluation.mlflow_log import log_refresh

        log_refresh(repo, figures, store, None if model is None else str(model))
    return figures
