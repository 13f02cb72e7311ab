"""Serving on paper: a discrete-event simulation of N replicas (continuous batching, routing,
local tiers over a shared block store). A batch of ``b`` requests on a replica takes::

    per_batch_ms + b * per_request_ms + per_token_ms * tokens recomputed
      + per_byte_ms * KV bytes fetched from (or written to) the shared store
      + per_block_ms * blocks re-positioned (each request's reused blocks)

Unit costs are timed on the repo's ranker (``simulate_costs.measure_units``); ``per_request_ms`` is fitted
at one ``bench-load`` rate and checked at the others on bench-load's own requests; docs/serving.md.
"""

from __future__ import annotations

import functools
import heapq
import json
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from rcllm_sdk.serving.routing import POLICIES, ReplicaState, Router

from .bench_load import LoadConfig, prewarm_bodies, run_bodies, zipf_ranks


@dataclass(frozen=True, slots=True)
class Costs:
    """Milliseconds: per batch, per request, per recomputed token, per KV byte, per block shifted."""

    per_batch_ms: float = 0.0
    per_request_ms: float = 0.0
    per_token_ms: float = 0.0
    per_byte_ms: float = 0.0
    per_block_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class Shape:
    """A request's prompt in tokens (measured means) and the KV bytes of one token."""

    item_tokens: float = 27.0
    user_tokens: float = 27.0
    prefix_tokens: float = 42.0  # system + history: what prefix caching reuses
    prompt_tokens: float = 632.0
    recompute_tokens: float = 90.0  # what a warm rcllm request recomputes
    bytes_per_token: float = 3072.0


def blocks_of(user: int, items) -> frozenset:
    """A request's blocks as the router sees them (``RequestPlan.blocks``)."""
    return frozenset(items) | {("user", user)}


class Cluster:
    """Replicas, router and shared store; state persists across :meth:`run` calls (phases)."""

    def __init__(
        self, costs, shape, replicas=1, routing="round_robin", batch=8, tier=0, *, mode="rcllm", warm=False
    ):
        """``batch``: max batch; ``tier``: blocks per local tier (0: one process, all stored blocks
        local); ``mode``: rcllm or prefix; ``warm``: every block stored (the refresh pipeline's)."""
        self.costs, self.shape, self.max_batch, self.tier_blocks = costs, shape, batch, tier
        self.mode, self.all_stored = mode, warm
        self.states = [ReplicaState(f"r{i}", tier or 1 << 40) for i in range(replicas)]
        self.router = Router(self.states, routing)
        self.tiers, self.stored = [OrderedDict() for _ in self.states], set()
        self.hits = self.used = 0

    def run(self, requests: list[frozenset], arrivals_ms) -> dict:
        """Serve ``requests`` arriving at ``arrivals_ms``; TTFT (arrival -> ranked) per request."""
        index = {id(s): i for i, s in enumerate(self.states)}
        queues, running = [deque() for _ in self.states], [[] for _ in self.states]
        events = [(float(t), 0, i) for i, t in enumerate(arrivals_ms)]  # (ms, 0 arrive | 1 done, id)
        heapq.heapify(events)
        ttft, batches, self.hits, self.used = [], [], 0, 0
        while events:
            now, kind, x = heapq.heappop(events)
            if kind == 0:
                chosen = self.router.choose(requests[x])
                self.router.record(chosen, requests[x])
                r = index[id(chosen)]
                queues[r].append((now, requests[x]))
            else:
                r = x
                for arrived in running[r]:
                    self.router.done(self.states[r])
                    ttft.append(now - arrived)
                running[r] = []
            if not running[r] and queues[r]:
                batch = [queues[r].popleft() for _ in range(min(self.max_batch, len(queues[r])))]
                running[r] = [arrived for arrived, _ in batch]
                batches.append(len(batch))
                heapq.heappush(events, (now + self.service_ms(r, [b for _, b in batch]), 1, r))
        p50, p99 = (float(v) for v in np.percentile(np.asarray(ttft, dtype=float), [50, 99]))
        hit_rate, batch = self.hits / self.used if self.used else 0.0, float(np.mean(batches))
        return dict(ttft_ms_p50=p50, ttft_ms_p99=p99, local_hit_rate=hit_rate, mean_batch_size=batch)

    def service_ms(self, r: int, batch: list[frozenset]) -> float:
        """One batch's time on replica ``r``. A block in the local tier costs its shift; only in the
        shared store, its bytes too; stored nowhere, its tokens and bytes (written); a block shared
        in the batch counts once. ``prefix``: one entry per user, the rest recomputed, no shift."""
        s, c, rcllm = self.shape, self.costs, self.mode == "rcllm"
        keys = [blocks if rcllm else frozenset(b for b in blocks if isinstance(b, tuple)) for blocks in batch]
        where = {k: self._where(r, k) for ks in keys for k in ks}
        tokens = len(batch) * (s.recompute_tokens if rcllm else s.prompt_tokens - s.prefix_tokens)
        nbytes = shifted = 0.0
        for k, at in where.items():  # once per batch
            size = (s.user_tokens if isinstance(k, tuple) else s.item_tokens) if rcllm else s.prefix_tokens
            tokens += size if at == "absent" else 0.0
            nbytes += size * s.bytes_per_token if at != "local" else 0.0
        for ks in keys:
            self.used += len(ks)
            self.hits += sum(1 for k in ks if where[k] == "local")
            shifted += sum(1 for k in ks if where[k] != "absent") if rcllm else 0
        self._keep(r, where)
        work = tokens * c.per_token_ms + nbytes * c.per_byte_ms + shifted * c.per_block_ms
        return c.per_batch_ms + len(batch) * c.per_request_ms + work

    def _where(self, r: int, key) -> str:
        stored = self.all_stored or key in self.stored
        local = key in self.tiers[r] if self.tier_blocks else stored
        return "local" if local else "shared" if stored else "absent"

    def _keep(self, r: int, keys) -> None:
        self.stored.update(keys)
        tier = self.tiers[r]
        for k in keys if self.tier_blocks else ():
            tier[k] = None
            tier.move_to_end(k)
        while self.tier_blocks and len(tier) > self.tier_blocks:
            tier.popitem(last=False)


def poisson_ms(rate: float, n: int, seed: int) -> np.ndarray:
    """bench-load's send times (``send_open_loop``), in ms."""
    return np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, n)) * 1000.0


def load_config(report: dict, repo: str) -> LoadConfig:
    names = {f.name for f in fields(LoadConfig)}
    return LoadConfig(**{**{k: v for k, v in report["config"].items() if k in names}, "repo": repo})


PREWARM_RPS = 50.0  # bench-load sends the prewarm closed loop; its timing is not compared


def phases(config: LoadConfig, blocks_for) -> list[tuple[float | None, list, np.ndarray]]:
    """What one bench-load server received: the prewarm requests (unless ``--no-prewarm``), the
    idle probe twice, then per rate its warm-up and its timed requests (``(rate, blocks,
    arrivals)``; rate None for untimed phases)."""
    idle, per_rate = run_bodies(config)
    everything = idle + [b for bodies in per_rate for b in bodies]
    warm = prewarm_bodies(config, everything) if config.prewarm else []
    out = [(None, blocks_for(warm), poisson_ms(PREWARM_RPS, len(warm), 0))] if warm else []
    out.append((None, blocks_for(idle), poisson_ms(20.0, len(idle), 0)))
    out.append((None, out[-1][1], poisson_ms(2.0, len(idle), 0)))
    for n, (rate, bodies) in enumerate(zip(config.rates, per_rate, strict=True)):
        warm, timed = bodies[: config.warmup], bodies[config.warmup :]
        out.append((None, blocks_for(warm), poisson_ms(rate, len(warm), config.seed + n)))
        out.append((rate, blocks_for(timed), poisson_ms(rate, len(timed), config.seed + 100 + n)))
    return out


def block_maker(config: LoadConfig, repo: str):
    """``bodies -> [blocks]``: the body's candidates, else the repo's retriever's for the user."""
    if config.candidates_from != "retriever":
        return lambda bodies: [blocks_of(b["user_id"], b["candidates"]) for b in bodies]
    import polars as pl

    from rcllm_sdk.retrieval import Retriever

    retriever = Retriever.load(Path(repo) / "data" / "retriever.npz")
    frame = pl.read_parquet(Path(repo) / "data" / "user_history.parquet", columns=["user_id", "item_ids"])
    history = dict(zip(frame["user_id"].to_list(), frame["item_ids"].to_list(), strict=True))

    @functools.cache
    def one(user: int) -> frozenset:
        found = history.get(user) or []
        return blocks_of(user, retriever.candidates(found, config.candidates) if found else ())

    return lambda bodies: [one(b["user_id"]) for b in bodies]


def replay(costs, shape, replicas: int, routing: str, max_batch: int, tier: int, stream, until=None) -> dict:
    """Per timed rate, the simulated row of one bench-load setting (stops after rate ``until``);
    ``single``: one process, whose store is all local."""
    single = routing == "single"
    n, policy = (1, "round_robin") if single else (replicas, routing)
    cluster = Cluster(costs, shape, n, policy, max_batch, 0 if single else tier)
    rows = {}
    for rate, blocks, arrivals in stream:
        result = cluster.run(blocks, arrivals)
        rows |= {} if rate is None else {rate: result}
        if rate is not None and rate == until:
            break
    return rows


def fit_line(xs, ys) -> tuple[float, float]:
    """Least-squares ``(slope, intercept)``."""
    return tuple(float(v) for v in np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1))


def fit_per_request(simulate_p50, measured_p50: float, rounds: int = 30) -> float:
    """The ``per_request_ms`` (bisection on [0, measured]) at which ``simulate_p50(ms)`` equals
    ``measured_p50``; the simulated p50 rises with it."""
    low, high = 0.0, measured_p50
    for _ in range(rounds):
        mid = (low + high) / 2
        low, high = (mid, high) if simulate_p50(mid) < measured_p50 else (low, mid)
    return (low + high) / 2


def check_row(rate: float, routing: str, batching: str, measured: float, simulated: float, fitted: bool):
    """One check: measured vs simulated p50 TTFT; ``error`` = simulated / measured - 1."""
    error = simulated / measured - 1.0
    row = dict(rate_rps=rate, routing=routing, batching=batching, fitted_here=fitted)
    return row | dict(measured_p50=measured, simulated_p50=simulated, error=error)


def max_batch_of(batching: str) -> int:  # a report's "none" or "continuous:N"
    return 1 if batching == "none" else int(batching.split(":")[1])


def check(report: dict, repo: str, units: Costs, shape: Shape, fit_rate: float) -> tuple[list, dict]:
    """Per (routing, batching) of the report: fit ``per_request_ms`` at ``fit_rate``, simulate the
    setting, compare every rate; the check rows and each setting's fitted costs."""
    config = load_config(report, repo)
    tier = report["config"].get("tier_blocks", 4096)
    stream = phases(config, block_maker(config, repo))
    checks, fitted, groups = [], {}, {}
    for r in report["runs"]:
        groups.setdefault((r["routing"], r["batching"]), {})[r["rate_rps"]] = r
    for (routing, batching), rows in groups.items():
        if fit_rate not in rows:
            continue
        mb = max_batch_of(batching)

        def sim(ms, until=None, routing=routing, mb=mb):
            costs = replace(units, per_request_ms=ms)
            return replay(costs, shape, config.replicas, routing, mb, tier, stream, until)

        measured = rows[fit_rate]["ttft_ms_p50"]
        ms = fit_per_request(lambda x: sim(x, fit_rate)[fit_rate]["ttft_ms_p50"], measured)
        fitted[f"{routing}/{batching}"] = replace(units, per_request_ms=ms)
        simulated = sim(ms)
        for rate, row in rows.items():
            p50s = row["ttft_ms_p50"], simulated[rate]["ttft_ms_p50"]
            checks.append(check_row(rate, routing, batching, *p50s, rate == fit_rate))
    return checks, fitted


PAPER = {"users": 100_000, "items": 50_000}  # the paper-scale synthetic world


def synthetic(n: int, seed: int, users: int, items: int, candidates: int = 20, zipf_s: float = 1.0):
    """``n`` requests' blocks: Zipf-popular users and distinct candidates (bench-load's model)."""
    rng, out = np.random.default_rng(seed), []
    for user in zipf_ranks(users, n, zipf_s, rng):
        picked: dict = {}
        while len(picked) < candidates:
            picked.update(dict.fromkeys(int(i) for i in zipf_ranks(items, candidates, zipf_s, rng)))
        out.append(blocks_of(int(user), list(picked)[:candidates]))
    return out


def project(costs, shape, world: dict, replicas: int, rate: float, tier: int, max_batch: int) -> list[dict]:
    """Per routing policy: TTFT p50/p99 of rcllm and prefix caching, local hit rates, with every
    block stored (the refresh pipeline's state); a warm-up stream first, then the timed one."""
    n = 1000 + 60 * replicas
    warm, timed = synthetic(n, 0, **world), synthetic(n, 1, **world)
    out = []
    for routing in POLICIES:
        row = {"replicas": replicas, "routing": routing, "rate_rps": rate, "tier_blocks": tier}
        for mode in ("rcllm", "prefix"):
            cluster = Cluster(costs, shape, replicas, routing, max_batch, tier, mode=mode, warm=True)
            cluster.run(warm, poisson_ms(rate, n, 1))
            result = cluster.run(timed, poisson_ms(rate, n, 2))
            row.update({f"{mode}_{k}": v for k, v in result.items()})
        out.append(row)
    return out


def run(repo: str, load_report: str, fit_rate: float, out: str, replicas=(8, 32, 100)) -> dict:
    """Time the unit costs, fit and check them on a bench-load report, project ``replicas`` at the
    fitted setting's load per replica; writes ``out`` JSON and a markdown table beside it."""
    report = json.loads(Path(load_report).read_text())
    config = load_config(report, repo)
    from .simulate_costs import measure_units

    units, shape, source = measure_units(repo, run_bodies(config)[1][0])
    checks, fitted = check(report, repo, units, shape, fit_rate)
    if not fitted:
        raise SystemExit(f"no row of {load_report} at rate {fit_rate:g}; pick one of its --rates")
    key = next((k for k in fitted if k.startswith("affinity/")), next(iter(fitted)))
    routing, batching = key.split("/")
    each, mb = fit_rate / (1 if routing == "single" else config.replicas), max_batch_of(batching)
    world = PAPER | {"candidates": config.candidates, "zipf_s": config.zipf_s}
    tier = max(1, round(config.tier_fraction * (1 + world["users"] + world["items"])))
    projections = [p for n in replicas for p in project(fitted[key], shape, world, n, each * n, tier, mb)]
    result = dict(unit_costs=asdict(units) | source, shape=asdict(shape), projected_with=key)
    result |= dict(fitted={k: asdict(v) for k, v in fitted.items()}, checks=checks, projections=projections)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    path.with_suffix(".md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    """The check table (measured vs simulated p50 per rate) and the projection table."""
    lines = [
        "| rate rps | routing | batching | measured p50 ms | simulated p50 ms | error |",
        "|---" * 6 + "|",
    ]
    for c in result["checks"]:
        rate = f"{c['rate_rps']:g}" + (" (fitted)" if c["fitted_here"] else "")
        cells = [rate, c["routing"], c["batching"], f"{c['measured_p50']:.1f}", f"{c['simulated_p50']:.1f}"]
        lines.append("| " + " | ".join([*cells, f"{c['error']:+.1%}"]) + " |")
    lines += ["", "| replicas | routing | rate rps | " + " | ".join(PROJECTED) + " |", "|---" * 8 + "|"]
    for p in result["projections"]:
        cells = [str(p["replicas"]), p["routing"], f"{p['rate_rps']:g}"]
        cells += [f"{p[key]:.2f}" if "hit" in key else f"{p[key]:.1f}" for key in PROJECTED.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


PROJECTED = {"TTFT p50 rcllm ms": "rcllm_ttft_ms_p50", "p99 rcllm": "rcllm_ttft_ms_p99"}
PROJECTED |= {"p50 prefix": "prefix_ttft_ms_p50", "p99 prefix": "prefix_ttft_ms_p99"}
PROJECTED |= {"local hit rate": "rcllm_local_hit_rate"}


def add_arguments(p) -> None:
    p.add_argument("--repo", required=True, help="the repo bench-load served (its ranker is timed here)")
    p.add_argument("--load", required=True, help="a bench-load report JSON of the same repo")
    p.add_argument("--fit-rate", type=float, required=True, help="the report's rate to fit per_request_ms on")
    p.add_argument("--replicas", type=int, nargs="+", default=[8, 32, 100], help="cluster sizes to project")
    p.add_argument("--out", default="bench_out/simulate.json", help="report JSON (.md beside it)")


def run_from_args(args) -> None:
    result = run(args.repo, args.load, args.fit_rate, args.out, tuple(args.replicas))
    print(markdown(result))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}")
