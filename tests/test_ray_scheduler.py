"""The router front of ``rcllm serve --replicas`` (``RayScheduler``) on stand-in replica handles,
no Ray: requests are planned before routing, so affinity sees their candidate items; replicas
get the planned candidates; a refused plan is a named error and reaches no replica; replica
batch sizes reach the metric."""

from __future__ import annotations

import asyncio

from rcllm_sdk.errors import UnknownUserError
from rcllm_sdk.request_plan import RequestPlan
from rcllm_sdk.serving.replicas import RayScheduler
from rcllm_sdk.serving.routing import ReplicaState, Router
from rcllm_sdk.serving.scheduler import Request

SHARED_ITEMS = list(range(100, 120))


class StandInReplica:
    """What a Ray Serve handle offers the router: ``handle.recommend.remote(request)``."""

    def __init__(self, name: str, calls: list, opened_batch: int):
        self.name, self.calls, self.opened_batch = name, calls, opened_batch
        self.recommend = self

    def remote(self, request: Request):
        async def answer():
            self.calls.append((self.name, request))
            return f"ranked for {request.user_id}", self.opened_batch

        return answer()


class StandInPlanner:
    """Users 1 and 2 share their retrieved candidates; user 3 has other ones; 404 is unknown."""

    def plan(self, user_ids, k, candidates):
        plans = []
        for user, count, given in zip(user_ids, k, candidates, strict=True):
            if user == 404:
                plans.append(UnknownUserError(f"user {user} is not in the feature store"))
                continue
            items = given or (SHARED_ITEMS if user in (1, 2) else list(range(300, 320)))
            plans.append(RequestPlan(user, count, [7, 8], items))
        return plans


def _scheduler(policy: str, calls: list, planner: object = "stand-in", opened_batch=0):
    handles = {f"r{i}": StandInReplica(f"r{i}", calls, opened_batch) for i in range(2)}
    router = Router([ReplicaState(name, 100) for name in handles], policy)
    planner = StandInPlanner() if planner == "stand-in" else planner
    return RayScheduler(handles, router, max_queue=16, planner=planner)


def _serve(scheduler, users):
    async def main():
        return [await scheduler.submit(Request(u, 5)) for u in users]

    return asyncio.run(main())


def test_affinity_sends_users_sharing_candidates_to_one_replica():
    calls: list = []
    assert _serve(_scheduler("affinity", calls), [1, 2]) == ["ranked for 1", "ranked for 2"]
    assert calls[0][0] == calls[1][0]  # user 2 reads user 1's 20 item blocks: same replica
    assert calls[1][1].candidates == SHARED_ITEMS  # the replica ranks the planned candidates
    assert calls[1][1].plan.history == [7, 8]  # and serves the router's plan as it is

    blind: list = []  # without planning the router sees only the user: the second user moves on
    _serve(_scheduler("affinity", blind, planner=None), [1, 2])
    assert blind[0][0] != blind[1][0] and blind[1][1].candidates is None


def test_a_refused_plan_is_the_named_error_and_reaches_no_replica():
    calls: list = []
    scheduler = _scheduler("round_robin", calls)

    async def main():
        return await scheduler.submit_many([Request(404, 5), Request(3, 5, candidates=[5, 6, 7, 8, 9])])

    refused, served = asyncio.run(main())
    assert isinstance(refused, UnknownUserError) and served == "ranked for 3"
    assert [request.user_id for _, request in calls] == [3] and calls[0][1].candidates == [5, 6, 7, 8, 9]
    assert scheduler.depth == 0


def test_batch_sizes_opened_on_replicas_reach_the_metric():
    sizes: list = []
    opening = _scheduler("round_robin", [], opened_batch=3)
    opening.on_batch = sizes.append
    _serve(opening, [1, 3])
    joining = _scheduler("round_robin", [], opened_batch=0)  # requests that joined a batch: not counted
    joining.on_batch = sizes.append
    _serve(joining, [1, 3])
    assert sizes == [3, 3]


def test_a_replica_serves_a_planned_request_without_planning_it_again():
    from types import SimpleNamespace

    from rcllm_sdk.serving.worker import Worker

    def no_second_read(*_):
        raise AssertionError("planned twice")

    config = SimpleNamespace(mode="rcllm", policy="default")
    rec = SimpleNamespace(config=config, ranker=object(), plan=no_second_read)
    planned = Request(1, 5, plan=RequestPlan(1, 5, [7, 8], SHARED_ITEMS))
    Worker(rec).plan([planned])
    assert planned.error is None and planned.blocks == planned.plan.blocks
