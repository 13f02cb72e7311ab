"""The admission scheduler with a stand-in runner: batching, affinity grouping, backpressure,
deadlines, graceful close; and that it stays planning code (no torch, no web stack)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading

import pytest

from rcllm_sdk.errors import DeadlineExceeded, Overloaded, UnknownUserError
from rcllm_sdk.serving.scheduler import Request, Scheduler, pick_batch


def _req(seq, blocks, variant=(None, None)):
    r = Request(user_id=seq, k=1, variant=variant, blocks=frozenset(blocks))
    r.seq = seq
    return r


def test_pick_batch_starts_with_the_oldest_and_groups_shared_blocks():
    pending = [
        _req(5, {"a", "b"}),
        _req(1, {"x", "y"}),  # the oldest: seeds the batch
        _req(2, {"a"}),
        _req(3, {"y", "z"}),
        _req(4, {"x", "y"}, variant=("full", None)),  # shares blocks, but another mode
        _req(6, {"x"}),
    ]
    batch = pick_batch(pending, 3)
    assert [r.seq for r in batch] == [1, 3, 6]  # most shared first (ties: arrival order)
    assert all(r.variant == (None, None) for r in batch)


class _Runner:
    """Plans every request (blocks: its user) and answers ``user_id * 10``; user < 0 is unknown.
    ``gate`` holds the worker until the test opens it."""

    def __init__(self):
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()

    def plan(self, requests):
        for r in requests:
            if r.user_id < 0:
                r.error = UnknownUserError(f"user {r.user_id} unknown")
            r.blocks = frozenset({r.user_id})

    def run(self, batch):
        self.gate.wait()
        self.batches.append([r.user_id for r in batch])
        return [r.user_id * 10 for r in batch]


def test_concurrent_requests_are_batched_and_answered_in_order():
    async def main():
        runner = _Runner()
        scheduler = Scheduler(runner.plan, runner.run, max_batch=4, max_wait_ms=50, max_queue=16)
        results = await asyncio.gather(*(scheduler.submit(Request(u, 1)) for u in range(8)))
        with pytest.raises(UnknownUserError):
            await scheduler.submit(Request(-1, 1))
        await scheduler.close()
        return runner, results

    runner, results = asyncio.run(main())
    assert results == [u * 10 for u in range(8)]
    assert max(len(b) for b in runner.batches) == 4 and sum(map(len, runner.batches)) == 8


def test_a_full_queue_refuses_with_overloaded_and_recovers():
    async def main():
        runner = _Runner()
        runner.gate.clear()  # the worker is busy: nothing drains
        scheduler = Scheduler(runner.plan, runner.run, max_batch=2, max_wait_ms=1, max_queue=4)
        first = [asyncio.ensure_future(scheduler.submit(Request(u, 1))) for u in range(2)]
        await asyncio.sleep(0)  # admitted
        while scheduler.depth:  # until the first batch is running (held)
            await asyncio.sleep(0.01)
        queued = [asyncio.ensure_future(scheduler.submit(Request(u, 1))) for u in range(2, 6)]
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded) as refused:
            await scheduler.submit(Request(99, 1))
        runner.gate.set()
        served = await asyncio.gather(*first, *queued)
        after = await scheduler.submit(Request(7, 1))
        await scheduler.close()
        return refused.value, served, after, scheduler.stats

    refused, served, after, stats = asyncio.run(main())
    assert refused.retry_after_s >= 1 and "queue full" in str(refused)
    assert served == [u * 10 for u in range(6)] and after == 70
    assert stats.rejected == 1


def test_a_request_past_its_deadline_is_not_run():
    async def main():
        runner = _Runner()
        runner.gate.clear()
        scheduler = Scheduler(runner.plan, runner.run, max_batch=1, max_wait_ms=1, max_queue=8)
        busy = asyncio.ensure_future(scheduler.submit(Request(1, 1)))
        await asyncio.sleep(0.05)
        late = asyncio.ensure_future(scheduler.submit(Request(2, 1, timeout_s=0.01)))
        await asyncio.sleep(0.1)  # its deadline passes while the worker is held
        runner.gate.set()
        outcomes = await asyncio.gather(busy, late, return_exceptions=True)
        await scheduler.close()
        return runner, outcomes

    runner, (busy, late) = asyncio.run(main())
    assert busy == 10 and isinstance(late, DeadlineExceeded)
    assert [2] not in runner.batches


def test_close_finishes_admitted_requests_and_refuses_new_ones():
    async def main():
        runner = _Runner()
        scheduler = Scheduler(runner.plan, runner.run, max_batch=2, max_wait_ms=20, max_queue=16)
        admitted = [asyncio.ensure_future(scheduler.submit(Request(u, 1))) for u in range(5)]
        await asyncio.sleep(0)  # admitted, not yet run
        closing = asyncio.ensure_future(scheduler.close())
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="shutting down"):
            await scheduler.submit(Request(9, 1))
        await closing
        return await asyncio.gather(*admitted)

    assert asyncio.run(main()) == [0, 10, 20, 30, 40]


def test_scheduler_and_routing_import_no_torch_and_no_web_stack():
    code = (
        "import sys, json, rcllm_sdk.serving.scheduler, rcllm_sdk.serving.routing\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'torch', 'fastapi', 'ray', 'feast', 'transformers'})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
