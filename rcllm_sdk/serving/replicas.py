"""Several replicas on Ray Serve behind the one HTTP process, which routes every request.

Each replica is a Ray Serve deployment of one :class:`Replica` (its own recommender, local block
tier, worker and batching scheduler), deployed as its own application so the router can address
it. :class:`RayScheduler` stands in for the local scheduler in ``create_app``: it plans each
request first (one Feast read and the retriever, no model: :class:`~rcllm_sdk.request_plan.Planner`)
so the router sees every block the request reads (its user and candidate items), picks a replica
with :class:`~rcllm_sdk.serving.routing.Router` and sends the request with its plan, so the
replica neither reads the history nor retrieves again. When a replica dies with a request in
flight it retries that request once on another replica and keeps the dead one out of rotation
for ``revive_after_s`` (Ray Serve restarts it). Ray is imported only here, only when
``rcllm serve --replicas N`` (N > 1) asks.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, replace

from ..errors import Overloaded, RcLLMError
from ..request_plan import Planner
from .routing import ReplicaState, Router
from .scheduler import Request, Scheduler
from .worker import Worker


class Replica:
    """One replica's recommender, worker and scheduler (the Ray Serve deployment's class)."""

    def __init__(self, repo: str, model: str | None, config: dict, scheduling: dict):
        from ..recommender import RcRecommender

        self.worker = Worker(RcRecommender.from_feature_store(repo, model=model, **config), repo)
        self.worker.warm_up()
        self.scheduling, self.scheduler = scheduling, None

    async def recommend(self, request: Request):
        """``(Recommendation, opened_batch)`` (the size of the batch the request opened, else 0:
        the router's batch-size metric); raises the request's named error."""
        if self.scheduler is None:  # made on the replica's own event loop
            self.scheduler = Scheduler(self.worker.plan, self.worker.run, **self.scheduling)
        result = await self.scheduler.submit(request)
        return result, request.opened_batch

    def model_version(self) -> str:
        return self.worker.model_version

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose store faults is restarted."""
        if not self.worker.store_reachable():
            raise Overloaded("the replica's block store is unreachable")


class ReplicaSet:
    """What ``create_app`` reads of its worker, for a set of Ray Serve replicas."""

    def __init__(self, router: Router, model_version: str):
        self.router, self.model_version, self.warmed = router, model_version, True
        self.rec = router  # readiness reads ``rec``: every replica loaded its model before deploying

    def warm_up(self) -> None:
        """Replicas warm up before they are deployed."""

    def store_reachable(self) -> bool:
        return any(r.alive for r in self.router.replicas)

    def close(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


class RayScheduler:
    """Plans and routes requests to replicas (``Scheduler``'s interface for ``create_app``).
    ``planner``: plans requests so the router sees all their blocks (``None``: the router sees
    the user and any client candidates); ``on_batch``: told each replica batch's size."""

    def __init__(
        self, handles: dict, router: Router, max_queue: int, planner=None, revive_after_s: float = 5.0
    ):
        self.handles, self.router, self.max_queue = handles, router, max_queue
        self.planner, self.revive_after_s, self.on_batch = planner, revive_after_s, None
        self._dead_since: dict[str, float] = {}
        self._planning = 0

    @property
    def depth(self) -> int:
        return sum(r.in_flight for r in self.router.replicas) + self._planning

    def start(self) -> None:
        """Nothing to start: replicas run their own schedulers."""

    async def close(self) -> None:
        """In-flight requests are awaited by their HTTP handlers; replicas drain their own queues."""

    async def submit(self, request: Request):
        (outcome,) = await self.submit_many([request])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def submit_many(self, requests: list[Request]) -> list:
        if self.depth + len(requests) > self.max_queue:
            raise Overloaded(f"{self.depth} requests in flight over the replicas; retry later", 1.0)
        self._planning += len(requests)
        try:
            routed = await self._planned(requests)
        finally:
            self._planning -= len(requests)
        return await asyncio.gather(
            *(self._route(r, blocks) if blocks is not None else _raise(r) for r, blocks in routed),
            return_exceptions=True,
        )

    async def _planned(self, requests: list[Request]) -> list[tuple]:
        """``(request to send, its blocks)`` per request; ``(named error, None)`` where planning
        refused it. One planning call (one Feast read) for all of them, off the event loop."""
        if self.planner is None:
            return [(r, frozenset(r.candidates or ()) | {("user", r.user_id)}) for r in requests]
        plans = await asyncio.to_thread(
            self.planner.plan,
            [r.user_id for r in requests],
            [r.k for r in requests],
            [r.candidates for r in requests],
        )
        out = []
        for request, plan in zip(requests, plans, strict=True):
            if isinstance(plan, Exception):
                out.append((plan, None))
            else:  # the replica serves this plan: no second Feast read or retrieval there
                sent = replace(request, candidates=plan.candidates or request.candidates, plan=plan)
                out.append((sent, plan.blocks))
        return out

    async def _route(self, request: Request, blocks: frozenset):
        tried: list[str] = []
        for _ in range(2):  # the first try and one retry on another replica
            self._revive()
            replica = self.router.pick(blocks, exclude=tried)
            try:
                result, opened_batch = await self.handles[replica.name].recommend.remote(request)
                if opened_batch and self.on_batch is not None:
                    self.on_batch(opened_batch)
                return result
            except Exception as exc:
                named = getattr(exc, "cause", exc)
                if isinstance(named, RcLLMError):
                    raise named from None
                if not _replica_gone(exc):
                    raise
                self.router.mark_dead(replica)
                self._dead_since[replica.name] = time.monotonic()
                tried.append(replica.name)
            finally:
                self.router.done(replica)
        raise Overloaded("the replicas serving this request failed twice; retry later", 1.0)

    def _revive(self) -> None:
        now = time.monotonic()
        for replica in self.router.replicas:
            died = self._dead_since.get(replica.name)
            if died is not None and now - died > self.revive_after_s:
                replica.alive = True  # Ray Serve has restarted it, or requests wait for it
                del self._dead_since[replica.name]


async def _raise(error: Exception):
    raise error


def _replica_gone(exc: Exception) -> bool:
    from ray.exceptions import ActorUnavailableError, RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    gone = (RayActorError, ActorUnavailableError, ReplicaUnavailableError, DeploymentUnavailableError)
    return isinstance(exc, gone)


def start_replicas(repo: str, model: str | None, config, settings, replicas: int, routing: str, **options):
    """Deploy ``replicas`` replicas; ``(RayScheduler, ReplicaSet)`` for ``create_app``.

    ``config``: the resolved :class:`~rcllm_sdk.config.RecommenderConfig` every replica uses;
    ``options``: ``ray_address`` (join a cluster; default a local one) and ``tier_blocks`` (each
    replica's local tier over the shared store, in blocks, and the router's estimate of it;
    default ``config.tier_blocks``, else 4096).
    """
    import ray
    from ray import serve

    if not ray.is_initialized():
        address = options.get("ray_address") or "local"  # never a cluster `ray start` left recorded
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    deployment = serve.deployment(
        Replica,
        max_ongoing_requests=settings.max_queue + settings.max_batch,
        health_check_period_s=2,
        ray_actor_options={"num_cpus": 0},
    )
    scheduling = {
        "max_batch": settings.max_batch,
        "max_wait_ms": settings.max_wait_ms,
        "max_queue": settings.max_queue,
        "deadline_ms": settings.deadline_ms,
    }
    tier = options.get("tier_blocks") or config.tier_blocks or 4096
    replica_config = asdict(replace(config, tier_blocks=tier))  # each its own bounded local tier
    handles = {}
    for i in range(replicas):
        name = f"rcllm-replica-{i}"
        app = deployment.options(name=name).bind(str(repo), model, replica_config, scheduling)
        handles[name] = serve.run(app, name=name, route_prefix=None)
    router = Router([ReplicaState(name, tier) for name in handles], routing)
    version = next(iter(handles.values())).model_version.remote().result()
    planner = Planner.from_repo(repo, config)
    scheduler = RayScheduler(handles, router, settings.max_queue * replicas, planner)
    return scheduler, ReplicaSet(router, version)
