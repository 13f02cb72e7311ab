"""The model side of a server: plans admitted requests and runs batches through
``RcRecommender.recommend_batch`` (one recommender per requested mode and policy)."""

from __future__ import annotations

import gc
import threading
from collections import defaultdict
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
        """Fill each request's ``plan`` and ``blocks`` (user, candidate items), or its ``error``:
        one ``RcRecommender.plan`` call (one Feast read) per mode and policy among them. Requests
        that arrive planned (a replica's, planned by the router) are not planned again."""
        by_variant = defaultdict(list)
        for request in requests:
            try:
                rec = self.recommender(request.variant)
            except RcLLMError as exc:
                request.error = exc
                continue
            if request.plan is None:
                by_variant[rec].append(request)
            else:
                request.blocks = request.plan.blocks
        for rec, group in by_variant.items():
            plans = rec.plan([r.user_id for r in group], [r.k for r in group], [r.candidates for r in group])
            for request, plan in zip(group, plans, strict=True):
                if isinstance(plan, Exception):
                    request.error = plan
                else:
                    request.plan, request.blocks = plan, plan.blocks

    def run(self, batch: list[Request]) -> list:
        """One result (a ``Recommendation`` cut to the request's ``k``) or exception per request,
        served from the requests' plans."""
        rec = self.recommender(batch[0].variant)
        try:
            return rec.recommend_planned([r.plan for r in batch])
        except RcLLMError:  # isolate the request that failed: the others are served
            return [self._run_one(rec, r) for r in batch]

    def _run_one(self, rec, r: Request):
        try:
            return rec.recommend_planned([r.plan])[0]
        except RcLLMError as exc:
            return exc

    def warm_up(self) -> None:
        """Serve one request (first forward, guard calibration, first store round trip)."""
        user = self._some_user()
        if user is not None:
            self.rec.recommend(user, k=1)
        gc.freeze()  # the loaded heap (~0.5 M objects: a full collection took ~0.3 s) is never scanned again
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
