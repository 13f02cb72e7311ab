"""``rcllm bench-load``: open-loop load on ``rcllm serve``.

For each routing policy (``--routing``, with ``--replicas N`` > 1 on Ray Serve; one process
otherwise, reported as ``single``) and batching setting (``--batching``: max batch sizes, 1 = no
batching) a server is started
as a subprocess on a free port; for each rate (``--rates``) a warm-up then the timed requests are
sent at Poisson arrival times (open loop: a late response never delays the next send) with users
and candidate items drawn Zipf-popular (exponent ``--zipf-s``), the same seeded stream for every
setting. First every block the run reads is stored (``--no-prewarm`` to skip: the state ``rcllm
refresh`` leaves, so timed requests measure serving, not first-touch computation of Zipf-tail
users). One row per (batching, rate):

- ``ttft_ms_p50/p95/p99``: the server's admission -> ranking time (queueing + batched prefill;
  the ranking is the first and only token), from the response's ``e2e_ms``;
- ``e2e_ms_p99``: the client's round trip (HTTP and JSON included);
- ``idle_ttft_ms_p50``: the median of 20 requests sent at 2/s, once their blocks are stored;
- ``throughput_rps``: answered 200s over the time from the first send to the last answer;
- ``mean_batch_size`` (from ``/metrics``), ``local_hit_rate`` (blocks read from the process's own
  store / blocks used), ``remote_bytes_per_request``, ``rejected`` (503s).

Writes ``--out`` JSON, a markdown table beside it and a PNG of TTFT CDFs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rcllm_sdk.cache.local_servers import free_port
from rcllm_sdk.cli_args import DEMO_REPO
from rcllm_sdk.errors import ServiceStartError


@dataclass(slots=True)
class LoadConfig:
    """What ``rcllm bench-load`` runs (defaults sized for a 2-core box)."""

    repo: str = DEMO_REPO
    out: str = "bench_out/load.json"
    rates: list[float] = field(default_factory=lambda: [10.0, 20.0, 40.0, 80.0])
    requests: int = 2000
    warmup: int = 500
    batching: list[int] = field(default_factory=lambda: [1, 8])
    replicas: int = 1
    routing: list[str] = field(default_factory=lambda: ["round_robin", "least_loaded", "affinity"])
    max_queue: int = 64
    store: str = "auto"  # memory:// in one process; with replicas a fresh Redis server per setting
    tier_fraction: float = 0.1  # with replicas: each one's local tier, a share of the blocks touched
    zipf_s: float = 1.0
    candidates_from: str = "zipf"  # or "retriever"
    candidates: int = 20
    k: int = 10
    seed: int = 0
    model: str | None = None  # default: the repo's ranker
    prewarm: bool = True  # store every block of the run first (the state `rcllm refresh` leaves)


def zipf_ranks(n_values: int, size: int, s: float, rng: np.random.Generator) -> np.ndarray:
    """``size`` popularity ranks in ``0..n_values-1`` with P(rank r) proportional to 1 / (r + 1)**s."""
    weights = 1.0 / np.arange(1, n_values + 1) ** s
    return rng.choice(n_values, size=size, p=weights / weights.sum())


def by_popularity(repo: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The repo's user ids and item ids, each in one seeded popularity order (most popular
    first), fixed for a run: every rate and setting draws from the same popular users and items."""
    import polars as pl

    data = Path(repo) / "data"
    users = pl.read_parquet(data / "user_history.parquet", columns=["user_id"])["user_id"].sort().to_numpy()
    items = pl.read_parquet(data / "items.parquet", columns=["item_id"])["item_id"].sort().to_numpy()
    rng = np.random.default_rng(seed)
    return rng.permutation(users), rng.permutation(items)


def request_bodies(config: LoadConfig, size: int, seed: int) -> list[dict]:
    """Request bodies drawn with ``seed``: Zipf-popular users; Zipf-popular distinct candidates
    unless the retriever picks them (popularity orders from :func:`by_popularity`)."""
    users, items = by_popularity(config.repo, config.seed)
    rng = np.random.default_rng(seed)
    bodies = []
    for user in users[zipf_ranks(len(users), size, config.zipf_s, rng)]:
        body = {"user_id": int(user), "k": config.k}
        if config.candidates_from == "zipf":
            picked: dict[int, None] = {}
            while len(picked) < config.candidates:
                picked.update(dict.fromkeys(zipf_ranks(len(items), config.candidates, config.zipf_s, rng)))
            body["candidates"] = [int(items[i]) for i in list(picked)[: config.candidates]]
        bodies.append(body)
    return bodies


def touched_blocks(bodies: list[dict], catalog_items: int) -> int:
    """Distinct blocks a run's requests read: the system block, one per user, one per item (all
    of the catalog where the retriever picks the candidates)."""
    users = {b["user_id"] for b in bodies}
    given = {i for b in bodies for i in b.get("candidates", ())}
    return 1 + len(users) + (len(given) if all("candidates" in b for b in bodies) else catalog_items)


def run_bodies(config: LoadConfig) -> tuple[list[dict], list[list[dict]]]:
    """The idle probe's bodies and each rate's (warm-up then timed): one seeded stream for all."""
    idle = request_bodies(config, 20, config.seed + 7)
    size = config.warmup + config.requests
    return idle, [request_bodies(config, size, config.seed + n) for n in range(len(config.rates))]


def prewarm_bodies(config: LoadConfig, bodies: list[dict]) -> list[dict]:
    """Bodies that read every block of ``bodies`` at least once: each of their users once, with
    their candidate items ``candidates`` at a time (the retriever's, where it picks them)."""
    users = sorted({b["user_id"] for b in bodies})
    if config.candidates_from == "retriever":
        return [{"user_id": u, "k": config.k} for u in users]
    items = sorted({i for b in bodies for i in b["candidates"]})
    size = config.candidates
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    chunks[-1] += [i for i in items if i not in chunks[-1]][: max(0, config.k - len(chunks[-1]))]
    count = max(len(users), len(chunks))
    return [
        {"user_id": users[n % len(users)], "k": config.k, "candidates": chunks[n % len(chunks)]}
        for n in range(count)
    ]


def prewarm(url: str, bodies: list[dict], per_call: int = 16) -> None:
    """Send ``bodies`` in ``/v1/recommend:batch`` calls, one after another (closed loop); a call
    the server refuses stops the run (its figures would time computation, not serving)."""
    import httpx

    with httpx.Client(base_url=url, timeout=600) as client:
        for start in range(0, len(bodies), per_call):
            reply = client.post("/v1/recommend:batch", json={"requests": bodies[start : start + per_call]})
            if reply.status_code != 200:
                raise ServiceStartError(
                    f"prewarming the store failed: HTTP {reply.status_code} {reply.text[:300]}"
                )


def tier_blocks(config: LoadConfig, bodies: list[dict]) -> int:
    """Each replica's local tier: ``tier_fraction`` of the distinct blocks the run touches."""
    import polars as pl

    items = pl.read_parquet(Path(config.repo) / "data" / "items.parquet", columns=["item_id"]).height
    return max(1, round(config.tier_fraction * touched_blocks(bodies, items)))


@contextmanager
def shared_store(config: LoadConfig):
    """The store URL of one setting: ``--store``, or for ``auto`` ``memory://`` in one process and
    a fresh redis-server (stopped afterwards) shared by the replicas. (Not LMCache's ``lm://``
    server: its reads cost ~40 ms per block here, which would swamp the routing effect.)"""
    if config.store != "auto":
        yield config.store
    elif config.replicas <= 1:
        yield "memory://"
    else:
        from rcllm_sdk.cache.local_servers import start_redis

        server = start_redis()
        try:
            yield server.url
        finally:
            server.kill()


READY_TIMEOUT_S = 600.0  # model load, warm-up, and Ray start on a slow box


@contextmanager
def serving(
    config: LoadConfig, max_batch: int, routing: str = "single", store: str = "memory://", tier: int = 0
):
    """``rcllm serve`` in a subprocess (replicas: each a local tier of ``tier`` blocks over
    ``store``); yields its URL once ``/readyz`` says ready."""
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "rcllm_sdk.cli", "serve", "--repo", config.repo, "--port", str(port)]
    command += ["--model", config.model] if config.model else []
    command += ["--store", store, "--max-batch", str(max_batch), "--max-queue", str(config.max_queue)]
    if routing != "single":
        command += ["--replicas", str(config.replicas), "--routing", routing, "--tier-blocks", str(tier)]
    proc = subprocess.Popen(command, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise ServiceStartError(f"rcllm serve exited: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise ServiceStartError(f"rcllm serve was not ready after {READY_TIMEOUT_S:.0f} s")
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=120)


async def send_open_loop(url: str, bodies: list[dict], rate: float, seed: int) -> tuple[list, float]:
    """Send ``bodies`` at Poisson times of mean ``rate``/s; ``[(status, client_ms, json)]`` and
    the seconds from the first send to the last answer."""
    import httpx

    gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(bodies))
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one(body, at):
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/recommend", json=body)
                return r.status_code, (time.perf_counter() - t0) * 1000.0, r.json()
            except httpx.HTTPError as exc:
                return 0, (time.perf_counter() - t0) * 1000.0, {"error": {"type": type(exc).__name__}}

        start = time.perf_counter()
        out = await asyncio.gather(*(one(b, at) for b, at in zip(bodies, np.cumsum(gaps), strict=True)))
        return out, time.perf_counter() - start


def _batch_totals(url: str) -> tuple[float, float]:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    values = dict(line.split() for line in text.splitlines() if line.startswith("rcllm_batch_size_"))
    return float(values.get("rcllm_batch_size_sum", 0)), float(values.get("rcllm_batch_size_count", 0))


def row(outcomes: list, seconds: float, batches: tuple[float, float]) -> dict:
    """One report row from a point's outcomes (see the module docstring)."""
    ok = [body for status, _, body in outcomes if status == 200]
    ttft = np.array([b["e2e_ms"] for b in ok]) if ok else np.array([np.nan])
    client = np.array([ms for status, ms, _ in outcomes if status == 200] or [np.nan])
    hits = sum(b["cache"]["hits"] for b in ok)
    used = hits + sum(b["cache"]["misses"] for b in ok)
    local = sum(b["cache"]["local_hits"] for b in ok)
    return {
        "throughput_rps": len(ok) / seconds,
        "ttft_ms_p50": float(np.percentile(ttft, 50)),
        "ttft_ms_p95": float(np.percentile(ttft, 95)),
        "ttft_ms_p99": float(np.percentile(ttft, 99)),
        "e2e_ms_p99": float(np.percentile(client, 99)),
        "mean_batch_size": batches[0] / batches[1] if batches[1] else 0.0,
        "local_hit_rate": local / used if used else 0.0,
        "remote_bytes_per_request": sum(b["cache"]["remote_bytes"] for b in ok) / max(1, len(ok)),
        "rejected": sum(1 for status, _, _ in outcomes if status == 503),
        "failed": sum(1 for status, _, _ in outcomes if status not in (200, 503)),
    }


def run(config: LoadConfig) -> dict:
    """Every (batching, rate) point; writes the JSON, markdown and PNG; returns the report."""
    runs, samples = [], {}
    routings = config.routing if config.replicas > 1 else ["single"]
    idle_bodies, rate_bodies = run_bodies(config)
    tier = tier_blocks(config, idle_bodies + [b for bodies in rate_bodies for b in bodies])
    for routing, max_batch in ((r, b) for r in routings for b in config.batching):
        with shared_store(config) as store, serving(config, max_batch, routing, store, tier) as url:
            if config.prewarm:  # every block stored, as `rcllm refresh` leaves the store
                prewarm(url, prewarm_bodies(config, idle_bodies + [b for bs in rate_bodies for b in bs]))
            asyncio.run(send_open_loop(url, idle_bodies, 20.0, 0))  # their blocks stored: a warm idle p50
            idle = asyncio.run(send_open_loop(url, idle_bodies, 2.0, 0))[0]
            idle_p50 = float(np.median([b["e2e_ms"] for s, _, b in idle if s == 200]))
            for n, (rate, bodies) in enumerate(zip(config.rates, rate_bodies, strict=True)):
                asyncio.run(send_open_loop(url, bodies[: config.warmup], rate, config.seed + n))
                before = _batch_totals(url)
                outcomes, seconds = asyncio.run(
                    send_open_loop(url, bodies[config.warmup :], rate, config.seed + 100 + n)
                )
                after = _batch_totals(url)
                figures = row(outcomes, seconds, (after[0] - before[0], after[1] - before[1]))
                batching = "none" if max_batch == 1 else f"continuous:{max_batch}"
                runs.append(
                    {
                        "routing": routing,
                        "batching": batching,
                        "rate_rps": rate,
                        **figures,
                        "idle_ttft_ms_p50": idle_p50,
                    }
                )
                samples[f"{routing}, {batching} @ {rate:g} rps"] = [
                    b["e2e_ms"] for s, _, b in outcomes if s == 200
                ]
                print(
                    json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in runs[-1].items()})
                )
    report = {"config": {**asdict(config), "tier_blocks": tier}, "runs": runs, "summary": summary(runs)}
    _write(report, samples, Path(config.out))
    return report


def summary(runs: list[dict]) -> dict:
    """The batching comparison and, with replicas, affinity's against round robin's."""
    return {**batching_gain(runs), "routing": routing_gain(runs)}


def routing_gain(runs: list[dict]) -> list[dict]:
    """Per (batching, rate) run by both: affinity's local hit rate over round robin's, and both
    p99 TTFTs (the issue's acceptance figure: >= 2x, p99 no worse)."""
    by = {(r["routing"], r["batching"], r["rate_rps"]): r for r in runs}
    out = []
    for (routing, batching, rate), rr in by.items():
        aff = by.get(("affinity", batching, rate))
        if routing != "round_robin" or aff is None:
            continue
        hit_ratio = aff["local_hit_rate"] / rr["local_hit_rate"] if rr["local_hit_rate"] else None
        out.append(
            {
                "batching": batching,
                "rate_rps": rate,
                "hit_rate": [rr["local_hit_rate"], aff["local_hit_rate"]],
                "hit_rate_ratio": hit_ratio,
                "ttft_ms_p99": [rr["ttft_ms_p99"], aff["ttft_ms_p99"]],
            }
        )
    return out


def batching_gain(runs: list[dict]) -> dict:
    """At the highest rate where batch-1 keeps p99 TTFT <= 2x its idle p50: continuous batching's
    throughput over batch-1's, and both p99s (the issue's acceptance figure); ``at_each_rate``: the
    same comparison at every batch-1 rate below saturation (no 503s), whatever its p99."""
    runs = [r for r in runs if r["routing"] == runs[0]["routing"]] if runs else []  # one policy's points
    if not any(r["batching"] == "none" for r in runs):
        return {"note": "no batch-1 runs to compare with (--batching 1 ...)"}
    batch1 = [r for r in runs if r["batching"] == "none"]
    batched = [r for r in runs if r["batching"] != "none"]
    top = max(batched, key=lambda r: r["throughput_rps"], default=None)
    out = {
        "continuous_max_throughput_rps": top["throughput_rps"] if top else None,
        "at_each_rate": [_gain_at(r, batched) for r in batch1 if not r["rejected"]],
    }
    single = [r for r in batch1 if r["ttft_ms_p99"] <= 2 * r["idle_ttft_ms_p50"]]
    if not single:
        return out | {"note": "batch-1 exceeded 2x its idle p50 at every rate; lower --rates"}
    best = _gain_at(max(single, key=lambda r: r["rate_rps"]), batched)
    return out | {
        f"batch1_{k}" if k in ("rate_rps", "throughput_rps", "ttft_ms_p99") else k: v for k, v in best.items()
    }


def _gain_at(one: dict, batched: list[dict]) -> dict:
    """Continuous batching's best throughput at a p99 no worse than batch-1's run ``one``."""
    ok = [r for r in batched if r["ttft_ms_p99"] <= one["ttft_ms_p99"]]
    equal_p99 = max(ok, key=lambda r: r["throughput_rps"], default=None)
    found = equal_p99["throughput_rps"] if equal_p99 else None
    return {
        "rate_rps": one["rate_rps"],
        "throughput_rps": one["throughput_rps"],
        "ttft_ms_p99": one["ttft_ms_p99"],
        "continuous_at_equal_p99_throughput_rps": found,
        "gain_at_equal_p99": found / one["throughput_rps"] if found else None,
    }


def _write(report: dict, samples: dict, out: Path) -> None:
    from rcllm_sdk.evaluation.figures import ttft_cdf

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))
    if samples:
        ttft_cdf(samples, out.with_suffix(".png"))


def markdown(report: dict) -> str:
    """The runs as a markdown table."""
    head = (
        "| routing | batching | rate rps | throughput rps | TTFT p50 | p95 | p99 ms | e2e p99 ms "
        "| mean batch | hit rate | rejected |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in report["runs"]:
        lines.append(
            f"| {r['routing']} | {r['batching']} | {r['rate_rps']:g} | {r['throughput_rps']:.1f} | "
            f"{r['ttft_ms_p50']:.1f} | "
            f"{r['ttft_ms_p95']:.1f} | {r['ttft_ms_p99']:.1f} | {r['e2e_ms_p99']:.1f} | "
            f"{r['mean_batch_size']:.2f} | {r['local_hit_rate']:.2f} | {r['rejected']} |"
        )
    return "\n".join(lines) + "\n\nsummary: " + json.dumps(report["summary"]) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = LoadConfig()
    p.add_argument("--repo", default=d.repo, help=f"ingested repo with a trained ranker (default {d.repo})")
    p.add_argument("--out", default=d.out, help=f"report JSON; .md and .png beside it (default {d.out})")
    p.add_argument("--rates", type=float, nargs="+", default=d.rates, help="offered rates, requests/s")
    p.add_argument("--requests", type=int, default=d.requests, help="timed requests per point")
    p.add_argument("--warmup", type=int, default=d.warmup, help="warm-up requests per point")
    p.add_argument("--batching", type=int, nargs="+", default=d.batching, help="max batch sizes (1: none)")
    p.add_argument("--replicas", type=int, default=d.replicas, help="replicas on Ray Serve (1: one process)")
    p.add_argument(
        "--routing", nargs="+", default=d.routing, help="routing policies compared (with --replicas)"
    )
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="server admission queue bound")
    p.add_argument(
        "--store",
        default=d.store,
        help="block store URL (default auto: memory:// in one process; with --replicas a fresh "
        "redis-server per setting, shared by the replicas)",
    )
    p.add_argument(
        "--tier-fraction",
        type=float,
        default=d.tier_fraction,
        help="with --replicas: each replica's local tier, a share of the distinct blocks the run "
        f"touches (default {d.tier_fraction})",
    )
    p.add_argument("--zipf-s", type=float, default=d.zipf_s, help="Zipf exponent of users and items")
    p.add_argument("--candidates-from", choices=["zipf", "retriever"], default=d.candidates_from)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--model", help="model to serve (default: the repo's ranker); as `rcllm serve --model`")
    p.add_argument(
        "--no-prewarm",
        dest="prewarm",
        action="store_false",
        help="do not store every block of the run before the first point (time first-touch computation too)",
    )


def run_from_args(args) -> None:
    keys = (
        "repo",
        "out",
        "rates",
        "requests",
        "warmup",
        "batching",
        "replicas",
        "routing",
        "max_queue",
        "store",
        "tier_fraction",
        "zipf_s",
        "candidates_from",
        "seed",
        "model",
        "prewarm",
    )
    run(LoadConfig(**{k: getattr(args, k) for k in keys}))
