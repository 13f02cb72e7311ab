import numpy as np
import polars as pl

from rcllm_sdk.data.split import TEST, VAL, histories
from rcllm_sdk.evaluation.metrics import METRICS, rank_of
from rcllm_sdk.ingest import read_manifest
from rcllm_sdk.retrieval import Retriever, RetrieverConfig
from research.retriever_grid import grid, retriever_ndcg


def _serving_ndcg(repo, k=20):
    """NDCG@10 of the retriever ingestion saved, on the test items: what `rcllm evaluate` reports."""
    interactions = pl.read_parquet(repo / "data" / "interactions.parquet")
    truth = dict(interactions.filter(pl.col("split") == TEST).select("user_id", "item_id").iter_rows())
    retriever = Retriever.load(repo / "data" / "retriever.npz")
    ranks = [
        rank_of(retriever.candidates(list(h), k), truth[u]) for u, h, _ in histories(interactions).iter_rows()
    ]
    return METRICS["ndcg@10"](np.array(ranks)).mean()


def test_test_split_score_is_the_serving_retrievers(ingested_repo):
    config = RetrieverConfig(**read_manifest(ingested_repo)["retriever"])
    assert np.isclose(retriever_ndcg(ingested_repo, config, TEST), _serving_ndcg(ingested_repo))


def test_grid_scores_every_setting_on_validation_and_test(ingested_repo):
    rows = grid([ingested_repo], decays=[0.3, 0.6], similarities=[0.0, 0.3])
    assert [(r["config"]["decay"], r["config"]["w_similarity"]) for r in rows] == [
        (0.3, 0.0),
        (0.3, 0.3),
        (0.6, 0.0),
        (0.6, 0.3),
    ]
    for row in rows:
        scores = row["scores"][ingested_repo.name]
        assert 0.0 <= scores[VAL] <= 1.0 and 0.0 <= scores[TEST] <= 1.0
        assert row["val_sum"] == scores[VAL]
    # validation hides the validation item from the retriever's fit: scores differ from test's
    assert any(r["scores"][ingested_repo.name][VAL] != r["scores"][ingested_repo.name][TEST] for r in rows)
