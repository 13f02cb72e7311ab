"""Shared test fixtures (tests/ and research/tests/): a tiny synthetic world, an ingested Feast repo and a
micro ranker trained on it."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault(
    "MLFLOW_TRACKING_URI",
    "sqlite:///" + os.path.join(os.environ.get("TMPDIR", "/tmp"), f"rcllm-test-{os.getpid()}.db"),
)

from rcllm_sdk.data.synthetic import SyntheticConfig  # noqa: E402

TINY = SyntheticConfig(n_users=80, n_items=120, n_categories=4, min_len=5, max_len=14, seed=3)


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
