"""Pipeline entry points over an ingested feature repo (``rcllm train``)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from rcllm_sdk.data.split import TEST, TRAIN, histories
from rcllm_sdk.ingest import fit_retriever, read_manifest
from rcllm_sdk.prompt import ItemInfo, PromptTemplate
from rcllm_sdk.retrieval import Retriever, RetrieverConfig

from .train import TrainConfig, train_ranker


def catalog_from_repo(repo: Path) -> dict[int, ItemInfo]:
    """Item features as ingested (the same rows Feast serves online)."""
    items = pl.read_parquet(repo / "data" / "items.parquet", columns=["item_id", "title", "category", "text"])
    return {r[0]: ItemInfo(*r) for r in items.iter_rows()}


def cross_fitted_groups(
    repo: Path, manifest: dict, folds: int = 2
) -> list[tuple[list[list[int]], Retriever]]:
    """Users split into ``folds`` by id; each fold's training sequences (validation and test
    items left out) get candidates from a retriever fitted on the other folds' histories."""
    interactions = pl.read_parquet(repo / "data" / "interactions.parquet")
    items = pl.read_parquet(repo / "data" / "items.parquet", columns=["item_id"])
    served = histories(interactions, exclude=(TEST,))
    train = histories(interactions.filter(pl.col("split") == TRAIN), exclude=())
    config = RetrieverConfig(**manifest["retriever"])
    groups = []
    for fold in range(folds):
        others = served.filter(pl.col("user_id") % folds != fold)
        retriever = fit_retriever(others, items, manifest["embedding"]["dim"], config)
        mine = train.filter(pl.col("user_id") % folds == fold)
        groups.append(([list(s) for s in mine["item_ids"]], retriever))
    return groups


def train_from_repo(
    repo: str | Path,
    out_dir: str | Path | None = None,
    config: TrainConfig | None = None,
    template: PromptTemplate | None = None,
    progress: bool = True,
    log_mlflow: bool = True,
) -> dict:
    """Train a ranker on the repo's training split, save it (HF format) and log an MLflow run.

    Returns ``{"model_dir", "run_id", "model_uri", "summary"}``; ``model_dir`` defaults to
    ``<repo>/data/ranker``, where ``RcRecommender.from_feature_store`` looks by default.
    """
    repo = Path(repo)
    manifest = read_manifest(repo)
    out_dir = Path(out_dir) if out_dir else repo / "data" / "ranker"
    config = config or TrainConfig()
    retriever = Retriever.load(repo / "data" / "retriever.npz")
    vectors = {int(i): retriever.embeddings[n] for n, i in enumerate(retriever.item_ids)}
    _, summary = train_ranker(
        cross_fitted_groups(repo, manifest),
        catalog_from_repo(repo),
        vectors,
        out_dir,
        config,
        template,
        progress,
    )
    summary["dataset"] = manifest["dataset"]
    run_id = None
    if log_mlflow:
        from rcllm_sdk.tracking import log_run

        params = {k: v for k, v in summary.items() if not isinstance(v, float)}
        metrics = {k: v for k, v in summary.items() if isinstance(v, float)}
        run_id = log_run("rcllm-train", params, metrics, {"model": out_dir})
    return {
        "model_dir": out_dir,
        "run_id": run_id,
        "model_uri": f"runs:/{run_id}/model" if run_id else None,
        "summary": summary,
    }
