"""Shared test fixtures (tests/ and research/tests/): a tiny synthetic world, an ingested Feast repo and a
micro ranker trained on it."""

from __future__ import annotations

import pytest

from rcllm_sdk.data.synthetic import SyntheticConfig

TINY = SyntheticConfig(n_users=80, n_items=120, n_categories=4, min_len=5, max_len=14, seed=3)


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory):
    """Every MLflow run of the session goes to a temporary sqlite store (artifacts beside it),
    never to the user's store or the working directory."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri = "sqlite:///" + str(folder / "mlflow.db")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        with pytest.MonkeyPatch.context() as here:
            here.chdir(folder)  # the store's Default experiment, made now, puts artifacts here, not ./mlruns
            from mlflow import MlflowClient

            MlflowClient().search_experiments()
        yield uri


@pytest.fixture(scope="session")
def tiny_world():
    from rcllm_sdk.data.synthetic import generate

    return generate(TINY)


@pytest.fixture(scope="session")
def ingested_repo(tmp_path_factory):
    from rcllm_sdk.ingest import ingest

    repo = tmp_path_factory.mktemp("repo")
    ingest("synthetic", None, repo, synthetic=TINY)
    return repo


@pytest.fixture(scope="session")
def trained_repo(ingested_repo):
    """The ingested repo with a micro ranker trained for a few steps at <repo>/data/ranker."""
    from rcllm_sdk.pipelines.run import train_from_repo
    from rcllm_sdk.pipelines.train import TrainConfig

    result = train_from_repo(
        ingested_repo,
        config=TrainConfig(recipe="verbalizer", size="micro", steps=8, batch_size=4, vocab_size=600),
        progress=False,
    )
    return ingested_repo, result
