"""``RcRecommender.plan`` then ``recommend_planned``: what a server's scheduler runs apart, equal
to ``recommend_batch`` and with one history read."""

from __future__ import annotations

import pytest

from rcllm_sdk import RcRecommender
from rcllm_sdk.errors import NotEnoughCandidatesError, UnknownUserError
from rcllm_sdk.request_plan import RequestPlan


def _users(repo, n):
    import polars as pl

    return pl.read_parquet(repo / "data" / "user_history.parquet")["user_id"].sort().to_list()[:n]


def test_plans_serve_as_recommend_batch_does_and_refuse_one_request_alone(trained_repo):
    repo, _ = trained_repo
    users = _users(repo, 3)
    with RcRecommender.from_feature_store(repo, store="memory://", guard=False) as rec:
        expected = rec.recommend_batch(users, k=5)
        reads = []
        histories = rec.features.histories
        rec.features.histories = lambda ids: reads.append(list(ids)) or histories(ids)
        plans = rec.plan([*users, 10**9], [5, 5, 3, 5])
        got = rec.recommend_planned(plans[:3])
    assert reads == [[*users, 10**9]]  # one history read, none while serving
    assert isinstance(plans[3], UnknownUserError) and all(isinstance(p, RequestPlan) for p in plans[:3])
    assert plans[0].blocks == frozenset(plans[0].candidates) | {("user", users[0])}
    assert [r.item_ids for r in got[:2]] == [r.item_ids for r in expected[:2]]
    assert got[2].item_ids == expected[2].item_ids[:3]  # each plan keeps its own k


def test_recommend_batch_raises_what_planning_refused(trained_repo):
    repo, _ = trained_repo
    with RcRecommender.from_feature_store(repo, mode="full") as rec:
        with pytest.raises(NotEnoughCandidatesError):
            rec.recommend_batch(_users(repo, 2), k=rec.config.candidates + 1)
