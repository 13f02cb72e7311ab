"""Prometheus metrics of one server (a registry per app, so several apps can share a process)."""

from __future__ import annotations

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    """Request count, TTFT and end-to-end histograms, batch size, queue depth, block hits and
    misses, recompute fraction; ``render()`` is the ``/metrics`` body."""

    def __init__(self, queue_depth):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "rcllm_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.ttft = Histogram(
            "rcllm_ttft_seconds", "prompt in -> label logits out", buckets=LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "rcllm_e2e_seconds",
            "admission -> result, queueing included",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.block_hits = Counter("rcllm_block_hits", "cached blocks read from the store", registry=r)
        self.block_misses = Counter("rcllm_block_misses", "blocks computed (not in the store)", registry=r)
        self.recompute = Histogram(
            "rcllm_recompute_fraction",
            "share of the prompt's tokens computed",
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
            registry=r,
        )
        depth = Gauge("rcllm_queue_depth", "admitted requests not yet running", registry=r)
        depth.set_function(queue_depth)
        self.batch_size = Histogram(
            "rcllm_batch_size", "requests per batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )

    def served(self, result, e2e_s: float) -> None:
        """Record one served recommendation."""
        self.ttft.observe(result.ttft_ms / 1000.0)
        self.e2e.observe(e2e_s)
        self.block_hits.inc(result.cache.hits)
        self.block_misses.inc(result.cache.misses)
        if result.source == "ranker":
            self.recompute.observe(result.cache.recomputed_fraction)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
