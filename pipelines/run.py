"""Pipeline entry points over an ingested feature repo (``rcllm train``)."""

from __future__ import annotations

import warnings
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
    repo: Path, manifest: dict, folds: int = 2, point_in_time: bool = False
) -> list[tuple[list[list[int]], Retriever]]:
    """Users split into ``folds`` by id; each fold's training sequences (validation and test
    items left out) get candidates from a retriever fitted on the other folds' histories. With
    ``point_in_time`` the sequences come from Feast's offline store, each user's as of their first
    held-out interaction (:mod:`.point_in_time`)."""
    interactions = pl.read_parquet(repo / "data" / "interactions.parquet")
    items = pl.read_parquet(repo / "data" / "items.parquet", columns=["item_id"])
    served = histories(interactions, exclude=(TEST,))
    train = (
        training_histories_as_of(repo, interactions)
        if point_in_time
        else histories(interactions.filter(pl.col("split") == TRAIN), exclude=())
    )
    config = RetrieverConfig(**manifest["retriever"])
    groups = []
    for fold in range(folds):
        others = served.filter(pl.col("user_id") % folds != fold)
        retriever = fit_retriever(others, items, manifest["embedding"]["dim"], config)
        mine = train.filter(pl.col("user_id") % folds == fold)
        groups.append(([list(s) for s in mine["item_ids"]], retriever))
    return groups


def training_histories_as_of(repo: Path, interactions: pl.DataFrame) -> pl.DataFrame:
    """``user_id, item_ids``: each user's items strictly before their first validation or test
    interaction (after their last, for users with none), read point in time from Feast."""
    from .point_in_time import histories_before, offline_store

    cut = interactions.group_by("user_id").agg(
        pl.when(pl.col("split") != TRAIN).then(pl.col("timestamp")).otherwise(None).min().alias("held_out"),
        (pl.col("timestamp").max() + 1).alias("after_last"),
    )
    cut = cut.with_columns(pl.coalesce("held_out", "after_last").alias("as_of")).sort("user_id")
    users, times = cut["user_id"].to_list(), cut["as_of"].to_list()
    sequences = histories_before(offline_store(repo, interactions), users, times)
    return pl.DataFrame(
        {"user_id": users, "item_ids": sequences}, schema_overrides={"item_ids": pl.List(pl.Int64)}
    )


def train_from_repo(
    repo: str | Path,
    out_dir: str | Path | None = None,
    config: TrainConfig | None = None,
    template: PromptTemplate | None = None,
    progress: bool = True,
    log_mlflow: bool = True,
    model_name: str | None = None,
    tags: dict | None = None,
    point_in_time: bool = False,
) -> dict:
    """Train a ranker on the repo's training split, save it (HF format) and log an MLflow run.

    Without ``out_dir`` the ranker goes to a new ``<repo>/data/models/v<N>`` and ``<repo>/data/ranker``
    (where ``RcRecommender.from_feature_store`` looks by default) is switched to it atomically. The
    MLflow run (``log_mlflow``) holds every setting as a param, the per-step loss and validation
    curves, the training data as a dataset input, the git commit, and the model folder under
    ``model``, registered as a version of ``model_name`` (default ``rcllm-ranker``). With
    ``point_in_time`` the training histories are read from Feast's offline store
    (:func:`training_histories_as_of`).

    Returns ``{"model_dir", "run_id", "model_uri", "version", "cutoff", "summary"}``.
    """
    from . import curves, registry

    repo = Path(repo)
    manifest = read_manifest(repo)
    versioned = out_dir is None
    out_dir = Path(out_dir) if out_dir else registry.next_model_dir(repo)
    config = config or TrainConfig()
    retriever = Retriever.load(repo / "data" / "retriever.npz")
    vectors = {int(i): retriever.embeddings[n] for n, i in enumerate(retriever.item_ids)}
    with curves.collect() as points:
        _, summary = train_ranker(
            cross_fitted_groups(repo, manifest, point_in_time=point_in_time),
            catalog_from_repo(repo),
            vectors,
            out_dir,
            config,
            template,
            progress,
        )
    summary["dataset"] = manifest["dataset"]
    if versioned:
        registry.point_current(repo, out_dir)
    cutoff = data_cutoff(repo)
    result = {"model_dir": out_dir, "run_id": None, "model_uri": None, "version": None, "cutoff": cutoff}
    if log_mlflow:
        source = "feast offline store, point in time" if point_in_time else "interactions.parquet"
        tags = {"rcllm.training_data": source, **(tags or {})}
        result.update(_log_training(repo, out_dir, config, summary, points, cutoff, model_name, tags))
    return {**result, "summary": summary}


def data_cutoff(repo: Path) -> int:
    """The newest interaction timestamp in the repo: what a model trained now has seen."""
    return int(
        pl.scan_parquet(repo / "data" / "interactions.parquet")
        .select(pl.col("timestamp").max())
        .collect()
        .item()
    )


def _log_training(repo, out_dir, config, summary, points, cutoff, model_name, tags) -> dict:
    """The train run: params, curves, dataset input, model artifacts and its registered version."""
    import mlflow

    from rcllm_sdk.tracking import flat_metrics, log_params, start_run

    from . import registry

    run_tags = {"rcllm.feature_repo": str(repo.resolve()), "rcllm.data_cutoff": str(cutoff), **(tags or {})}
    with start_run("rcllm-train", repo, tags=run_tags) as run:
        settings = config.record()
        figures = {k: v for k, v in summary.items() if k not in settings and _is_number(v)}
        described = {
            k: v
            for k, v in summary.items()
            if k not in settings and k not in figures and not isinstance(v, (list, dict))  # curves: metrics
        }
        log_params({**settings, **described})
        mlflow.log_metrics(dict(flat_metrics(figures)))
        for name, curve in points.items():
            for step, value in curve:
                mlflow.log_metric(name, value, step=step)
        train = pl.read_parquet(repo / "data" / "interactions.parquet").filter(pl.col("split") == TRAIN)
        with warnings.catch_warnings():  # mlflow: "source can be interpreted in multiple ways" (harmless)
            warnings.filterwarnings("ignore", message="The specified dataset source")
            dataset = mlflow.data.from_polars(train, source=str((repo / "data").resolve()), name="train")
        mlflow.log_input(dataset, context="training", tags={"split": TRAIN, "feature_repo": str(repo)})
        version = registry.register(
            run,
            out_dir,
            model_name,
            {
                "rcllm.data_cutoff": cutoff,
                "rcllm.model_dir": out_dir.resolve(),
                "rcllm.feature_repo": repo.resolve(),
            },
        )
        mlflow.set_tag("rcllm.model_version", version)
    return {
        "run_id": run.info.run_id,
        "model_uri": registry.registry_uri(version, model_name),
        "version": version,
    }


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
