"""``rcllm bench-storage``, cluster half: refresh throughput into a real cluster and TTFT with one
node down.

The bench starts its own nodes on 127.0.0.1 (LMCache servers and redis-servers, alternating),
refreshes every block of a ``reference``-workload request stream into them, then times the
``rcllm`` mode (default policy) twice, each time from a fresh worker (empty local tier): with
every node up, and after killing one node. Rankings of the two runs are compared; they must
be equal (a lost block is read from a replica or recomputed).
"""

from __future__ import annotations

import time

import numpy as np

from rcllm_sdk.cache.cluster import ClusterConfig, ClusterStore, NodeSpec
from rcllm_sdk.cache.local_servers import start_lmcache, start_redis
from rcllm_sdk.cache.placement import hash_placement
from rcllm_sdk.model.tokenizer import label_token_ids
from rcllm_sdk.runtime.engine import BlockEngine
from rcllm_sdk.runtime.policies import DEFAULT_POLICY
from rcllm_sdk.runtime.refresh import refresh_blocks

from .bench import build_bench_ranker, render_requests, request_blocks, request_stream
from .bench_config import WORKLOADS, BenchConfig


def node_down_report(
    model: str = "cpu-512x8", nodes: int = 4, replicas: int = 1, requests: int = 16, progress: bool = True
) -> dict:
    """Refresh figures and p50 TTFT healthy vs one node down (``ttft_ms_p50_healthy``, ``_one_down``)."""
    workload = WORKLOADS["reference"]
    ranker, templates, catalog = build_bench_ranker(
        BenchConfig(workloads=["reference"], model=model), [workload]
    )
    template = templates["reference"]
    stream = request_stream(BenchConfig().stream, workload, requests, salt=0)
    prompts = render_requests(stream, catalog, template, ranker)
    labels = [label_token_ids(ranker.tokenizer, template.labels[: workload.candidates])] * len(prompts)
    blocks = request_blocks(stream, catalog, template, ranker)
    servers = [start_lmcache() if n % 2 == 0 else start_redis() for n in range(nodes)]
    try:
        config = ClusterConfig(
            [NodeSpec(s.url) for s in servers],
            hash_placement(list(catalog), nodes),
            replicas=replicas,
            local_cpu_gb=2.0,
            node_buffer_gb=0.5,
            timeout_s=2.0,
        )
        with _Worker(ranker, config) as (engine, store):
            refreshed = refresh_blocks(engine, blocks, progress=progress)
            refreshed["mb_written_per_s"] = store.stats.bytes_written / 2**20 / refreshed["seconds"]
        with _Worker(ranker, config) as (engine, _):
            healthy = _timed_requests(engine, prompts, labels)
        victim = servers[1 % nodes]
        victim.kill()
        with _Worker(ranker, config) as (engine, _):
            down = _timed_requests(engine, prompts, labels)
    finally:
        for server in servers:
            server.stop()
    same = all(
        np.array_equal(np.argsort(-a), np.argsort(-b))
        for a, b in zip(healthy["logits"], down["logits"], strict=False)
    )
    return {
        "model": model,
        "nodes": nodes,
        "replicas": replicas,
        "requests": requests,
        "policy": DEFAULT_POLICY,
        "killed_node": victim.url,
        "refresh": refreshed,
        "ttft_ms_p50_healthy": healthy["ttft_ms_p50"],
        "ttft_ms_p50_one_down": down["ttft_ms_p50"],
        "healthy": _public(healthy),
        "one_down": _public(down),
        "rankings_equal": same,
    }


class _Worker:
    """``with _Worker(ranker, config) as (engine, store)``: a fresh worker on the cluster."""

    def __init__(self, ranker, config: ClusterConfig):
        self.store = ClusterStore("cluster://bench", ranker.fingerprint, config)
        self.engine = BlockEngine(ranker, self.store, DEFAULT_POLICY)

    def __enter__(self):
        return self.engine, self.store

    def __exit__(self, *exc):
        self.engine.close()
        self.store.close()


def _timed_requests(engine: BlockEngine, prompts, labels) -> dict:
    ms, caches, logits = [], [], []
    for prompt, label_ids in zip(prompts, labels, strict=False):
        t0 = time.perf_counter()
        scored = engine.score([prompt], [label_ids])[0]
        ms.append((time.perf_counter() - t0) * 1000.0)
        engine.flush()  # write-back of recomputed blocks is not part of TTFT
        caches.append(scored.cache)
        logits.append(scored.logits.float().numpy())
    mean = lambda name: float(np.mean([getattr(c, name) for c in caches]))  # noqa: E731
    return {
        "ttft_ms_p50": float(np.median(ms)),
        "ttft_ms_p95": float(np.percentile(ms, 95)),
        "misses_mean": mean("misses"),
        "local_hits_mean": mean("local_hits"),
        "nodes_touched_mean": mean("nodes_touched"),
        "remote_bytes_mean": mean("remote_bytes"),
        "logits": logits,
    }


def _public(figures: dict) -> dict:
    return {k: v for k, v in figures.items() if k != "logits"}


def node_down_markdown(report: dict) -> str:
    rows = [
        "| cluster | TTFT p50 ms | p95 ms | misses / request | nodes touched | remote MiB / request |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("healthy", "one_down"):
        f = report[name]
        rows.append(
            f"| {name.replace('_', ' ')} | {f['ttft_ms_p50']:.1f} | {f['ttft_ms_p95']:.1f} | "
            f"{f['misses_mean']:.2f} | {f['nodes_touched_mean']:.2f} | {f['remote_bytes_mean'] / 2**20:.2f} |"
        )
    r = report["refresh"]
    rows.append(
        f"\nrefresh into {report['nodes']} nodes (replicas {report['replicas']}): {r['computed']} blocks, "
        f"{r['blocks_per_s']:.1f} blocks/s, {r['tokens_per_s']:.0f} tokens/s, "
        f"{r['mb_written_per_s']:.1f} MiB/s, {r['write_failures']} write failures; "
        f"rankings equal with a node down: {report['rankings_equal']}"
    )
    return "\n".join(rows)
