"""Admission and batching of concurrent requests (planning code: no torch here).

Requests enter a bounded admission queue (``max_queue``; full -> :class:`Overloaded`, HTTP 503).
One loop forms batches: it waits for ``max_batch`` requests or ``max_wait_ms`` after the oldest
arrival (default 0: a batch is what queued while the previous one ran), plans the new ones
(their blocks: user and candidate items, one call for all of them), drops those past their
deadline, and picks a batch seeded by the oldest request and filled with the requests that share
the most blocks with it (same mode and policy), so shared blocks are fetched and re-positioned
once per batch. Planning, picking and running take one hop to one worker thread; the next batch
forms while the current runs (continuous batching of prefill). ``close()`` refuses new requests
and finishes every admitted one.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import DeadlineExceeded, Overloaded


@dataclass(slots=True, eq=False)
class Request:
    """One admitted request. ``plan`` (what the runner serves) and ``blocks`` are filled by the
    planner (``error`` where planning refused it); ``candidates`` are the client's, if any;
    ``variant`` is the (mode, policy) a batch must share; ``opened_batch``: the size of the batch
    this request was the first of (0 for the others, so counting them counts batches)."""

    user_id: int
    k: int
    variant: tuple[str | None, str | None] = (None, None)
    candidates: list[int] | None = None
    timeout_s: float | None = None
    deadline: float = math.inf
    arrived: float = field(default_factory=time.monotonic)
    seq: int = 0
    blocks: frozenset = frozenset()
    plan: object | None = None
    error: Exception | None = None
    future: asyncio.Future | None = None
    opened_batch: int = 0


@dataclass(slots=True)
class SchedulerStats:
    """Cumulative figures of one scheduler (a snapshot)."""

    admitted: int = 0
    rejected: int = 0
    expired: int = 0
    batches: int = 0
    batched_requests: int = 0
    busy_s: float = 0.0


def pick_batch(pending: Sequence[Request], max_batch: int) -> list[Request]:
    """The oldest request and up to ``max_batch - 1`` others of its variant sharing the most
    blocks with the batch so far (ties: arrival order). Seeding with the oldest bounds waiting."""
    seed = min(pending, key=lambda r: r.seq)
    rest = [r for r in pending if r is not seed and r.variant == seed.variant]
    batch, blocks = [seed], set(seed.blocks)
    while rest and len(batch) < max_batch:
        best = max(rest, key=lambda r: (len(blocks & r.blocks), -r.seq))
        rest.remove(best)
        batch.append(best)
        blocks |= best.blocks
    return batch


class Scheduler:
    """Batches concurrent ``submit`` calls for a runner (asyncio; run it on one event loop).

    ``plan(requests)`` fills each request's ``plan`` and ``blocks`` (or ``error``);
    ``run(batch)`` returns one result or exception per request. Both run on the worker thread.
    ``on_batch(size)`` is told each batch's size (metrics).
    """

    def __init__(
        self,
        plan: Callable[[list[Request]], None],
        run: Callable[[list[Request]], list],
        max_batch: int = 8,
        max_wait_ms: float = 0.0,
        max_queue: int = 64,
        deadline_ms: float = 30_000.0,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.plan, self.run = plan, run
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self.deadline_s, self.on_batch = deadline_ms / 1000.0, on_batch
        self.stats = SchedulerStats()
        self._arrivals: list[Request] = []
        self._pending: list[Request] = []
        self._planning = 0  # arrivals being planned on the worker thread
        self._wake = asyncio.Event()
        self._seq = itertools.count()
        self._closing = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rcllm-batch")
        self._task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        """Admitted requests not yet running."""
        return len(self._arrivals) + len(self._pending) + self._planning

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def submit(self, request: Request):
        """Admit ``request`` and wait for its result; raises what the runner raised for it,
        :class:`Overloaded` when the queue is full and :class:`DeadlineExceeded` when it waited
        past its deadline (``timeout_s``, at most the scheduler's ``deadline_ms``)."""
        (outcome,) = await self.submit_many([request])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def submit_many(self, requests: list[Request]) -> list:
        """Admit all of ``requests`` or none; one result or exception per request, in order."""
        self._admit(requests)
        return await asyncio.gather(*(r.future for r in requests), return_exceptions=True)

    def _admit(self, requests: list[Request]) -> None:
        if self._closing:
            raise Overloaded("the server is shutting down; retry on another replica", self.retry_after_s())
        if self.depth + len(requests) > self.max_queue:
            self.stats.rejected += len(requests)
            raise Overloaded(
                f"admission queue full ({self.depth}/{self.max_queue} waiting); retry later",
                self.retry_after_s(),
            )
        self.start()
        now, loop = time.monotonic(), asyncio.get_running_loop()
        for r in requests:
            budget = min(r.timeout_s or math.inf, self.deadline_s)
            r.arrived, r.deadline, r.seq, r.future = now, now + budget, next(self._seq), loop.create_future()
        self._arrivals.extend(requests)
        self.stats.admitted += len(requests)
        self._wake.set()

    def retry_after_s(self) -> int:
        """Seconds until the queue has likely drained: depth / measured throughput, at least 1."""
        done, busy = self.stats.batched_requests, self.stats.busy_s
        per_request = busy / done if done else 0.1
        return max(1, math.ceil(self.depth * per_request))

    async def close(self) -> None:
        """Refuse new requests, finish every admitted one, stop the worker thread."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not (self._closing and not self.depth):
            if not self.depth:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._gather_wait()
            arrivals, self._arrivals = self._arrivals, []
            self._planning = len(arrivals)
            try:
                refused, batch, results = await loop.run_in_executor(self._executor, self._step, arrivals)
            except Exception as exc:  # a bug in planning code: fail what waits, keep the loop alive
                refused, batch, results = self._pending + arrivals, [], []
                self._pending, self._planning = [], 0
                for r in refused:
                    r.error = r.error or exc
            for r in refused:
                _resolve(r, r.error)
            for r, result in zip(batch, results, strict=True):
                _resolve(r, result)
            if batch and self.on_batch is not None:
                self.on_batch(len(batch))

    async def _gather_wait(self) -> None:
        """Wait until a full batch is queued, the oldest waited ``max_wait_ms``, or closing."""
        oldest = min(r.arrived for r in self._arrivals + self._pending)
        while self.depth < self.max_batch and not self._closing:
            left = oldest + self.max_wait_s - time.monotonic()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                return

    def _step(self, arrivals: list[Request]) -> tuple[list[Request], list[Request], list]:
        """On the worker thread (one hop per batch): plan the arrivals, refuse those that failed
        planning or passed their deadline, pick one batch and run it. Futures are resolved by
        the loop: ``(refused, batch, results)``."""
        if arrivals:
            self._plan_safely(arrivals)
        now, refused, waiting = time.monotonic(), [], []
        for r in self._pending + arrivals:
            if r.error is None and now > r.deadline:
                self.stats.expired += 1
                waited = (now - r.arrived) * 1000.0
                r.error = DeadlineExceeded(f"waited {waited:.0f} ms, past the deadline; retry later")
            (waiting if r.error is None else refused).append(r)
        if not waiting:
            self._pending, self._planning = [], 0
            return refused, [], []
        batch = pick_batch(waiting, self.max_batch)
        batch[0].opened_batch = len(batch)
        chosen = {id(r) for r in batch}
        self._pending, self._planning = [r for r in waiting if id(r) not in chosen], 0  # queued, not running
        started = time.monotonic()
        try:
            results = self.run(batch)
        except Exception as exc:  # the runner isolates request errors; this is a bug or a crash
            results = [exc] * len(batch)
        self.stats.batches += 1
        self.stats.batched_requests += len(batch)
        self.stats.busy_s += time.monotonic() - started
        return refused, batch, results

    def _plan_safely(self, requests: list[Request]) -> None:
        try:
            self.plan(requests)
        except Exception as exc:  # a failed plan fails its requests, never the loop
            for r in requests:
                r.error = r.error or exc


def _resolve(request: Request, outcome) -> None:
    if request.future is None or request.future.done():
        return
    if isinstance(outcome, BaseException):
        request.future.set_exception(outcome)
    else:
        request.future.set_result(outcome)
