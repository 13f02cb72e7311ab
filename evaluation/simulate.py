"""Serving on paper: a discrete-event simulation of N replicas with continuous batching and
routing, to project what one machine cannot run (8-100 replicas).

Each replica runs one batch at a time (up to ``max_batch`` requests queued while the previous
ran, as ``rcllm serve`` does); a batch of ``b`` requests with ``m`` blocks missing from the
replica's local tier takes ``per_batch_ms + b * per_request_ms + m * per_miss_ms``. Requests
arrive open loop (Poisson) with Zipf-popular users and items; a request's blocks are its user
and its candidate items; routing is :class:`rcllm_sdk.serving.routing.Router` (the code the
server runs), each replica's local tier an LRU of ``tier_blocks`` blocks.

The costs are fitted on this machine by :func:`measure_costs` (the server's worker in process,
batches of 1 and ``max_batch``, blocks cold and warm) and the simulation is checked against
``rcllm bench-load`` at a rate it was not fitted on (``check``). Imports only numpy and the
planning modules, so it runs anywhere.
"""

from __future__ import annotations

import heapq
from dataclasses import asdict, dataclass

import numpy as np

from rcllm_sdk.serving.routing import ReplicaState, Router


@dataclass(frozen=True, slots=True)
class Costs:
    """Milliseconds of one batch: fixed, per request, per block missing from the local tier."""

    per_batch_ms: float
    per_request_ms: float
    per_miss_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class Workload:
    """The request stream: Zipf users and items; ``candidates`` items per request."""

    users: int = 1000
    items: int = 5000
    candidates: int = 20
    zipf_s: float = 1.0
    seed: int = 0


def requests(workload: Workload, n: int) -> list[frozenset]:
    """Each request's blocks: its user and its Zipf-drawn distinct candidate items."""
    rng = np.random.default_rng(workload.seed)

    def zipf(size, count):
        weights = 1.0 / np.arange(1, size + 1) ** workload.zipf_s
        return rng.choice(size, count, p=weights / weights.sum())

    out = []
    for user in zipf(workload.users, n):
        items: set = set()
        while len(items) < workload.candidates:
            items.update(int(i) for i in zipf(workload.items, workload.candidates - len(items)))
        out.append(frozenset({("u", int(user))} | {("i", i) for i in items}))
    return out


def simulate(
    costs: Costs,
    rate_rps: float,
    workload: Workload,
    replicas: int = 1,
    routing: str = "affinity",
    max_batch: int = 8,
    tier_blocks: int = 4096,
    n_requests: int = 4000,
) -> dict:
    """TTFT (arrival -> ranking) percentiles, local hit rate and mean batch size."""
    sim = _Simulation(costs, replicas, routing, max_batch, tier_blocks)
    gaps = np.random.default_rng(workload.seed + 1).exponential(1000.0 / rate_rps, n_requests)
    return {
        "rate_rps": rate_rps,
        "replicas": replicas,
        "routing": routing,
        **sim.run(requests(workload, n_requests), np.cumsum(gaps)),
    }


class _Simulation:
    """Event loop state: per replica a queue, the batch running and the router's view."""

    def __init__(self, costs: Costs, replicas: int, routing: str, max_batch: int, tier_blocks: int):
        self.costs, self.max_batch = costs, max_batch
        self.states = [ReplicaState(f"r{i}", tier_blocks) for i in range(replicas)]
        self.router = Router(self.states, routing)
        self.queues: list[list] = [[] for _ in self.states]
        self.running: list[list[float]] = [[] for _ in self.states]
        self.events: list = []
        self.ttft: list[float] = []
        self.batches: list[int] = []
        self.hits = self.used = 0

    def run(self, stream: list[frozenset], arrivals: np.ndarray) -> dict:
        self.events = [(float(t), 0, i) for i, t in enumerate(arrivals)]  # (ms, 0 arrive | 1 done, id)
        heapq.heapify(self.events)
        while self.events:
            now, kind, payload = heapq.heappop(self.events)
            index = self._arrive(stream[payload], now) if kind == 0 else self._finish(payload, now)
            if not self.running[index]:
                self._start(index, now)
        ttft = np.array(self.ttft)
        return {
            "ttft_ms_p50": float(np.percentile(ttft, 50)),
            "ttft_ms_p99": float(np.percentile(ttft, 99)),
            "local_hit_rate": self.hits / self.used if self.used else 0.0,
            "mean_batch_size": float(np.mean(self.batches)),
        }

    def _arrive(self, blocks: frozenset, now: float) -> int:
        replica = self.router.choose(blocks)
        missing = frozenset(b for b in blocks if b not in replica.resident)
        self.router.record(replica, blocks)
        index = self.states.index(replica)
        self.queues[index].append((now, missing))
        self.hits += len(blocks) - len(missing)
        self.used += len(blocks)
        return index

    def _finish(self, index: int, now: float) -> int:
        for arrived in self.running[index]:
            self.router.done(self.states[index])
            self.ttft.append(now - arrived)
        self.running[index] = []
        return index

    def _start(self, index: int, now: float) -> None:
        if not self.queues[index]:
            return
        batch, self.queues[index] = self.queues[index][: self.max_batch], self.queues[index][self.max_batch :]
        misses = len(frozenset().union(*(m for _, m in batch)))  # a block shared in the batch: once
        c = self.costs
        done = now + c.per_batch_ms + len(batch) * c.per_request_ms + misses * c.per_miss_ms
        self.running[index] = [arrived for arrived, _ in batch]
        self.batches.append(len(batch))
        heapq.heappush(self.events, (done, 1, index))


def measure_costs(repo: str, max_batch: int = 8, rounds: int = 10) -> Costs:
    """Fit the batch costs on this machine: the server's worker in process (``memory://``),
    batches of 1 and ``max_batch`` with blocks warm, and one cold batch for the miss cost."""
    import time

    from rcllm_sdk import RcRecommender
    from rcllm_sdk.serving.scheduler import Request
    from rcllm_sdk.serving.worker import Worker

    rec = RcRecommender.from_feature_store(repo, store="memory://")
    worker = Worker(rec, repo)
    users = sorted({int(u) for u in _users(repo)})

    def batch_ms(size: int, offset: int) -> tuple[float, int]:
        batch = [Request(users[(offset + j) % len(users)], 10) for j in range(size)]
        started = time.perf_counter()
        worker.plan(batch)
        results = worker.run(batch)
        return (time.perf_counter() - started) * 1000.0, sum(r.cache.misses for r in results)

    worker.warm_up()  # first forward, system block
    cold_ms, misses = batch_ms(max_batch, len(users) // 2)  # blocks of users not seen yet
    warm = {size: np.median([batch_ms(size, 0)[0] for _ in range(rounds)]) for size in (1, max_batch)}
    worker.close()
    per_request = (warm[max_batch] - warm[1]) / (max_batch - 1)
    per_miss = max(0.0, (cold_ms - warm[max_batch]) / misses) if misses else 0.0
    return Costs(float(max(0.0, warm[1] - per_request)), float(per_request), float(per_miss))


def _users(repo: str):
    import polars as pl

    return pl.read_parquet(f"{repo}/data/user_history.parquet", columns=["user_id"])["user_id"].to_list()


def fit_overhead(costs: Costs, rate_rps: float, measured_p50_ms: float, workload: Workload) -> Costs:
    """``costs`` plus the per-request work outside the batch (HTTP, JSON, the event loop) that
    makes the simulated p50 at ``rate_rps`` equal the measured one (bisection)."""
    low, high = 0.0, 50.0
    for _ in range(25):
        mid = (low + high) / 2
        trial = Costs(costs.per_batch_ms, costs.per_request_ms + mid, costs.per_miss_ms)
        if simulate(trial, rate_rps, workload, n_requests=3000)["ttft_ms_p50"] < measured_p50_ms:
            low = mid
        else:
            high = mid
    return Costs(costs.per_batch_ms, float(costs.per_request_ms + low), costs.per_miss_ms)


def run(repo: str, load_report: str, fit_rate: float, out: str, replicas=(8, 32)) -> dict:
    """Measure and fit the costs, check them at the other rates of a ``bench-load`` report (its
    one-process continuous-batching rows), project ``replicas`` under each routing policy at
    half the fitted rate per replica (100,000 users, 50,000 items, 5,000-block local tiers)."""
    import json
    from pathlib import Path

    report = json.loads(Path(load_report).read_text())
    rows = [r for r in report["runs"] if r["routing"] == "single" and r["batching"] != "none"]
    fit_row = next(r for r in rows if r["rate_rps"] == fit_rate)
    users = len(set(_users(repo)))
    workload = Workload(users=users, items=_items(repo), zipf_s=report["config"]["zipf_s"])
    measured = measure_costs(repo, int(fit_row["batching"].split(":")[1]))
    costs = fit_overhead(measured, fit_rate, fit_row["ttft_ms_p50"], workload)
    checks = []
    for r in rows:
        sim = simulate(costs, r["rate_rps"], workload, n_requests=3000)
        error = sim["ttft_ms_p50"] / r["ttft_ms_p50"] - 1
        checks.append(
            {
                "rate_rps": r["rate_rps"],
                "fitted_here": r is fit_row,
                "measured_p50": r["ttft_ms_p50"],
                "simulated_p50": sim["ttft_ms_p50"],
                "error": error,
            }
        )
    paper = Workload(users=100_000, items=50_000, zipf_s=workload.zipf_s)
    projections = [
        simulate(costs, fit_rate / 2 * n, paper, n, routing, tier_blocks=5000, n_requests=200 * n + 4000)
        for n in replicas
        for routing in ("round_robin", "least_loaded", "affinity")
    ]
    result = {
        "measured_costs": asdict(measured),
        "fitted_costs": asdict(costs),
        "checks": checks,
        "projections": projections,
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    return result


def _items(repo: str) -> int:
    import polars as pl

    return pl.read_parquet(f"{repo}/data/items.parquet", columns=["item_id"]).height


def add_arguments(p) -> None:
    p.add_argument("--repo", required=True, help="the repo bench-load served (its ranker is timed here)")
    p.add_argument("--load", required=True, help="a bench-load report JSON of the same repo")
    p.add_argument("--fit-rate", type=float, required=True, help="the report's rate to fit on")
    p.add_argument("--replicas", type=int, nargs="+", default=[8, 32], help="cluster sizes to project")
    p.add_argument("--out", default="bench_out/simulate.json", help="report JSON")


def run_from_args(args) -> None:
    import json

    result = run(args.repo, args.load, args.fit_rate, args.out, tuple(args.replicas))
    for row in result["checks"] + result["projections"]:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
