"""The model side of a server: plans admitted requests and runs batches through
``RcRecommender.recommend_batch`` (one recommender per requested mode and policy)."""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from ..errors import InvalidRequestError, RcLLMError
from .scheduler import Request

MAX_VARIANTS = 8  # distinct (mode, policy) recommenders one server keeps


class Worker:
    """Plans and runs batches for a :class:`~rcllm_sdk.serving.scheduler.Scheduler`.

    ``rec`` serves requests that name no mode or policy; others get ``rec.with_config(...)``,
    built on first use and kept (they share its features, retriever and ranker; rebuilt when
    ``rec.reload()`` swapped the ranker).
    """

    def __init__(self, rec, repo: str | Path | None = None):
        self.rec, self.repo = rec, Path(repo) if repo is not None else None
        self._variants = {(rec.config.mode, rec.config.policy): rec}
        self._lock = threading.Lock()
        self.warmed = False

    @property
    def model_version(self) -> str:
        return self.rec.model_version

    def recommender(self, variant: tuple[str | None, str | None]):
        """The recommender of a request's ``(mode, policy)`` (``None``: the server's setting)."""
        from ..runtime.policies import parse_policy

        mode = variant[0] or self.rec.config.mode
        policy = parse_policy(variant[1]).spec if variant[1] else self.rec.config.policy
        with self._lock:
            found = self._variants.get((mode, policy))
            if found is not None and found.ranker is not self.rec.ranker:  # the model was reloaded
                found.close()
                found = None
            if found is None:
                if len(self._variants) >= MAX_VARIANTS and (mode, policy) not in self._variants:
                    raise InvalidRequestError(
                        f"this server keeps {MAX_VARIANTS} mode/policy combinations, all in use "
                        f"({sorted(self._variants)}); use one of them"
                    )
                found = self._variants[(mode, policy)] = self.rec.with_config(mode=mode, policy=policy)
            return found

    def plan(self, requests: list[Request]) -> None:
        """Fill each request's candidates and blocks (user, candidate items), or its error."""
        histories = self.rec.features.histories([r.user_id for r in requests])
        for request, found in zip(requests, histories, strict=True):
            try:
                self._plan_one(request, found)
            except RcLLMError as exc:
                request.error = exc

    def _plan_one(self, request: Request, found) -> None:
        rec = self.recommender(request.variant)
        rec._check_k(request.k)
        history = rec._history_or_cold_start(request.user_id, found)
        if request.candidates is not None:
            rec._check_candidates(request.candidates, request.k)
        elif history is not None:
            request.candidates = rec._candidates(history)
        request.blocks = frozenset(request.candidates or ()) | {("user", request.user_id)}

    def run(self, batch: list[Request]) -> list:
        """One result (a ``Recommendation`` cut to the request's ``k``) or exception per request."""
        rec = self.recommender(batch[0].variant)
        groups = defaultdict(list)  # by candidate count: every k of a group fits its candidates
        for r in batch:
            groups[len(r.candidates) if r.candidates else 0].append(r)
        done = {}
        for group in groups.values():
            for r, result in zip(group, self._run_group(rec, group), strict=True):
                done[id(r)] = result if isinstance(result, Exception) else _top(result, r.k)
        return [done[id(r)] for r in batch]

    def _run_group(self, rec, group: list[Request]) -> list:
        k = max(r.k for r in group)
        try:
            return rec.recommend_batch([r.user_id for r in group], k, [r.candidates for r in group])
        except RcLLMError:  # isolate the request that failed: the others are served
            return [self._run_one(rec, r) for r in group]

    def _run_one(self, rec, r: Request):
        try:
            return rec.recommend(r.user_id, r.k, r.candidates)
        except RcLLMError as exc:
            return exc

    def warm_up(self) -> None:
        """Serve one request (first forward, guard calibration, first store round trip)."""
        user = self._some_user()
        if user is not None:
            self.rec.recommend(user, k=1)
        self.warmed = True

    def _some_user(self) -> int | None:
        path = self.repo / "data" / "user_history.parquet" if self.repo else None
        if path is None or not path.exists():
            return None
        import polars as pl

        users = pl.read_parquet(path, columns=["user_id"])["user_id"]
        return int(users[0]) if len(users) else None

    def store_reachable(self) -> bool:
        """A probe read of the block store raised no fault (``full`` mode has no store)."""
        engine = self.rec.engine
        if engine is None:
            return True
        before = engine.store.stats.errors
        engine.store.batched_contains([1])
        return engine.store.stats.errors == before

    def close(self) -> None:
        for rec in self._variants.values():
            rec.close()


def _top(result, k: int):
    return replace(result, item_ids=result.item_ids[:k], scores=result.scores[:k], labels=result.labels[:k])
