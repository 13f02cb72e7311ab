"""``rcllm ingest``: source files -> leave-one-out split -> embeddings and retriever -> Feast.

What lands in ``<repo>/data/``:

* ``interactions.parquet`` — every interaction with ``position`` and ``split`` (train/val/test);
* ``user_history.parquet`` / ``items.parquet`` — the Feast sources, materialized online; the
  histories stop before each user's test item, so no test item reaches a prompt;
* ``retriever.npz`` — transitions, popularity and item embeddings fitted on those histories;
* ``dataset.json`` — a manifest (source, counts, skipped rows, split sizes, embedding method,
  retriever settings).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

from .data.embeddings import item_embeddings
from .data.sources import Dataset, load
from .data.split import TEST, VAL, histories, leave_one_out
from .data.synthetic import SyntheticConfig
from .features import FeatureClient, check_online_store, init_repo
from .features.snapshot import commit, staging_folder
from .features.store import PASSWORD_ENV, online_store_password
from .retrieval import Retriever, RetrieverConfig

EMBEDDING_METHOD = "PPMI of item co-occurrence within 3 positions, truncated SVD, L2-normalised"


@dataclass(slots=True)
class IngestResult:
    repo: Path
    users: int
    items: int
    interactions: int
    test_users: int
    skipped: dict

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        return (
            f"ingested {self.interactions:,} interactions of {self.users:,} users over {self.items:,} items "
            f"into {self.repo} ({self.test_users:,} test users; {skipped} malformed rows skipped)"
        )


def ingest(
    source: str,
    path: str | Path | None,
    repo: str | Path,
    *,
    online_store: str = "sqlite",
    skip_bad_rows: bool = False,
    synthetic: SyntheticConfig | None = None,
    embedding_dim: int = 32,
    retriever_config: RetrieverConfig | None = None,
) -> IngestResult:
    """Ingest one source into the feature repo ``repo`` (created when missing).

    Everything is read, checked and computed first (the source's files, the split, the
    retriever, the online store's reachability); the new repo is then built in a staging folder
    and moved over the old files all at once (:mod:`rcllm_sdk.features.snapshot`), so a failure at
    any step leaves the previous repo serving as it was. A Redis password in ``online_store`` is
    never written to disk: serving processes read it from ``$RCLLM_ONLINE_STORE_PASSWORD``.

    Raises:
        DataFormatError: a source file is missing, empty or malformed, or holds no rows.
        FeatureRepoError: the online store is not supported or cannot be reached.

    Example:
        >>> ingest("synthetic", None, "feature_repo/")
    """
    dataset = load(source, path, skip_bad_rows=skip_bad_rows, synthetic=synthetic)
    return ingest_dataset(dataset, repo, online_store, embedding_dim, retriever_config or RetrieverConfig())


def ingest_dataset(
    dataset: Dataset,
    repo: str | Path,
    online_store: str = "sqlite",
    embedding_dim: int = 32,
    retriever_config: RetrieverConfig | None = None,
) -> IngestResult:
    """Split ``dataset``, fit the retriever, check the online store, then build the repo in a
    staging folder and commit it (what :func:`ingest` and ``rcllm ingest --append`` share)."""
    retriever_config = retriever_config or RetrieverConfig()
    interactions = leave_one_out(dataset.interactions)
    served = histories(interactions, exclude=(TEST,))
    retriever = fit_retriever(served, dataset.items, embedding_dim, retriever_config)
    items = dataset.items.with_columns(
        pl.Series("embedding", retriever.embeddings, dtype=pl.List(pl.Float32))
    )
    check_online_store(online_store)
    repo = Path(repo)
    result = IngestResult(
        repo,
        served.height,
        dataset.items.height,
        interactions.height,
        int((interactions["split"] == TEST).sum()),
        dataset.skipped,
    )
    repo.mkdir(parents=True, exist_ok=True)
    with staging_folder(repo) as staging:
        _write_repo(staging, repo, online_store, interactions, retriever, served, items)
        _write_manifest(
            staging / "data" / "dataset.json", dataset, interactions, result, embedding_dim, retriever_config
        )
        commit(staging, repo)
    return result


def _write_repo(
    staging: Path,
    repo: Path,
    online_store: str,
    interactions: pl.DataFrame,
    retriever: Retriever,
    served: pl.DataFrame,
    items: pl.DataFrame,
) -> None:
    """Every ingested file of a complete repo, written into ``staging`` (``repo`` is not touched)."""
    if (repo / ".feastignore").exists():
        shutil.copyfile(repo / ".feastignore", staging / ".feastignore")
    init_repo(staging, online_store, keep_yaml_from=repo)
    password = online_store_password(online_store)
    if password:
        os.environ[PASSWORD_ENV] = password  # Feast reads it from the yaml's ${...} in this process
    interactions.write_parquet(staging / "data" / "interactions.parquet")
    retriever.save(staging / "data" / "retriever.npz")
    FeatureClient(staging).apply_and_materialize(served, items)


def fit_retriever(served: pl.DataFrame, items: pl.DataFrame, dim: int, config: RetrieverConfig) -> Retriever:
    """Retriever and embeddings from the histories Feast serves (test items excluded)."""
    return Retriever.fit(*retriever_inputs(served, items, dim), config)


def retriever_inputs(
    served: pl.DataFrame, items: pl.DataFrame, dim: int
) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
    """``(sequences, item_ids, embeddings)`` for :meth:`Retriever.fit`: everything but the blend settings."""
    item_ids = items["item_id"].to_numpy()
    index = {int(i): n for n, i in enumerate(item_ids)}
    sequences = [list(s) for s in served["item_ids"]]
    dense = [np.array([index[i] for i in s], np.int64) for s in sequences]
    return sequences, item_ids, item_embeddings(dense, len(item_ids), dim)


def _write_manifest(
    path: Path,
    dataset: Dataset,
    interactions: pl.DataFrame,
    result: IngestResult,
    dim: int,
    config: RetrieverConfig,
) -> None:
    splits = dict(interactions.group_by("split").len().iter_rows())
    manifest = {
        "dataset": dataset.name,
        "users": result.users,
        "items": result.items,
        "interactions": result.interactions,
        "splits": splits,
        "skipped_rows": dataset.skipped,
        "embedding": {"method": EMBEDDING_METHOD, "dim": dim},
        "retriever": asdict(config),
        "history_view": f"all interactions before each user's {TEST} item ({VAL} item included)",
    }
    path.write_text(json.dumps(manifest, indent=2))


def read_manifest(repo: str | Path) -> dict:
    path = Path(repo) / "data" / "dataset.json"
    if not path.exists():
        from .errors import FeatureRepoError

        raise FeatureRepoError(f"{path} not found: run `rcllm ingest --repo {repo}` first")
    return json.loads(path.read_text())
