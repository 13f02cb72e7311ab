"""Planning requests before they run: validation, history, candidates and blocks, per request.

``RcRecommender.plan`` makes one :class:`RequestPlan` per request (or the named error that
refuses it alone) from one Feast read of the histories; ``RcRecommender.recommend_planned``
serves a batch of plans without reading the histories again. ``recommend_batch`` is the two in
turn, and a server's scheduler groups plans by their blocks in between.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import validation
from .errors import (
    EmptyHistoryError,
    InvalidRequestError,
    NotEnoughCandidatesError,
    RcLLMError,
    UnknownItemError,
    UnknownUserError,
)


@dataclass(frozen=True, slots=True)
class RequestPlan:
    """What one request runs: ``history`` (oldest first; ``None``: a cold start served the
    popular items) and the ``candidates`` the ranker ranks (the client's, else the retriever's)."""

    user_id: int
    k: int
    history: list[int] | None
    candidates: list[int] | None

    @property
    def blocks(self) -> frozenset:
        """The cacheable blocks it reads, by identity: its user block and one per candidate item."""
        return frozenset(self.candidates or ()) | {("user", self.user_id)}


@dataclass(frozen=True, slots=True)
class Planner:
    """Planning without a model: the features, retriever and settings ``plan_requests`` reads.
    A router plans with one before it picks a replica, so it knows every block a request reads."""

    features: object
    retriever: object
    config: object  # a RecommenderConfig: ``candidates`` and ``cold_start``

    @classmethod
    def from_repo(cls, repo: str | Path, config) -> Planner:
        from .features import FeatureClient
        from .retrieval import Retriever

        return cls(FeatureClient(repo), Retriever.load(Path(repo) / "data" / "retriever.npz"), config)

    def plan(self, user_ids, k=10, candidates=None) -> list[RequestPlan | RcLLMError]:
        """As ``RcRecommender.plan``."""
        return plan_requests(self, user_ids, k, candidates)


def plan_requests(rec, user_ids, k: int | Sequence[int], candidates) -> list[RequestPlan | RcLLMError]:
    """One plan or named error per user of ``rec`` (an ``RcRecommender``); ``k`` is one count
    for all or one per user. A malformed ``user_ids`` or ``candidates`` raises for the batch."""
    user_ids = validation.user_ids(user_ids)
    given = validation.candidate_lists(candidates, len(user_ids))
    ks = list(k) if isinstance(k, (list, tuple)) else [k] * len(user_ids)
    if len(ks) != len(user_ids):
        raise InvalidRequestError(f"{len(ks)} values of k for {len(user_ids)} users; give one per user")
    histories = rec.features.histories(user_ids)
    plans: list[RequestPlan | RcLLMError] = []
    for user, count, items, found in zip(user_ids, ks, given, histories, strict=True):
        try:
            plans.append(_plan_one(rec, user, count, items, found))
        except RcLLMError as exc:
            plans.append(exc)
    return plans


def _plan_one(rec, user: int, k, items: list[int] | None, found) -> RequestPlan:
    k = check_k(k, rec.config.candidates)
    if items is not None:
        check_candidates(items, k, rec.retriever, rec.config.candidates)
    history = history_or_cold_start(user, found, rec.config.cold_start)
    if items is None and history is not None:
        items = retrieve(rec.retriever, history, rec.config.candidates)
    return RequestPlan(user, k, history, items if history is not None else None)


def check_k(k, candidates: int) -> int:
    """``k`` as an int in 1..``candidates`` (the ranker's candidate count)."""
    k = validation.count(k, "k")
    if not 1 <= k <= candidates:
        raise NotEnoughCandidatesError(
            f"k={k} but the ranker sees {candidates} candidates; "
            f"ask for 1 <= k <= {candidates} or raise `candidates`"
        )
    return k


def check_candidates(items: list[int], k: int, retriever, candidates: int) -> list[int]:
    """Client candidates: catalog items, at least ``k`` and at most ``candidates`` of them."""
    unknown = [i for i in items if i not in retriever.index]
    if unknown:
        raise UnknownItemError(f"candidates {unknown[:10]} are not in the catalog; pass known item ids")
    if not k <= len(items) <= candidates:
        raise NotEnoughCandidatesError(
            f"{len(items)} candidates given for k={k}; give k to {candidates} items"
        )
    return items


def history_or_cold_start(user: int, found, cold_start: str) -> list[int] | None:
    """The user's history from a Feast row, ``None`` for a cold start served popular items, or
    the named error when ``cold_start`` is ``raise``."""
    if found is None:
        if cold_start == "popular":
            return None
        raise UnknownUserError(
            f"user {user} is not in the feature store; ingest their interactions or set cold_start='popular'"
        )
    if not found[0]:
        if cold_start == "popular":
            return None
        raise EmptyHistoryError(f"user {user} has no interactions; set cold_start='popular' to serve them")
    return found[0]


def retrieve(retriever, history: list[int], candidates: int) -> list[int]:
    """The retriever's ``candidates`` unseen items for ``history``."""
    found = retriever.candidates(history, candidates)
    if len(found) < candidates:
        raise NotEnoughCandidatesError(
            f"the retriever found {len(found)} unseen items, fewer than candidates={candidates}; lower it"
        )
    return found
