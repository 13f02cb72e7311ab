"""Typed results returned by the recommender."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class CacheStats:
    """Per-request KV-cache figures (all zero in ``full`` mode, which reuses nothing).

    Attributes:
        hits: cacheable blocks (``rcllm``) or prefix chunks (``prefix``) read from the store.
        misses: those computed instead (and written back); a stored value that fails its
            header check counts as a miss.
        recomputed_fraction: share of the prompt's tokens computed in this request.
        kv_bytes_read: KV bytes read from the store.
        local_hits: hits served from this process's CPU tier (multi-node stores).
        remote_bytes: KV bytes fetched from storage nodes (multi-node stores).
        nodes_touched: distinct storage nodes that served this request (multi-node stores).
        fallback_full: ``rcllm`` ran full prefill because the prompt was too short for reuse to pay.

    Example:
        >>> c = rec.recommend(user_id=1).cache
        >>> c.hits, c.misses, f"{c.recomputed_fraction:.0%}"
    """

    hits: int = 0
    misses: int = 0
    recomputed_fraction: float = 1.0
    kv_bytes_read: int = 0
    local_hits: int = 0  # hits served from this process's memory (the CPU tier)
    remote_bytes: int = 0  # KV bytes fetched from storage nodes
    nodes_touched: int = 0  # distinct storage nodes that served this request
    fallback_full: bool = False  # rcllm ran full prefill: the prompt was too short for reuse to pay


@dataclass(slots=True)
class Recommendation:
    """Ranked items for one user.

    Attributes:
        item_ids: best first, ``k`` of them.
        scores: the ranker's label logits for those items (popularity rank for cold start).
        labels: the prompt labels the items carried (empty for cold start).
        user_id: the user ranked for.
        ttft_ms: prompt tokens in -> label logits out.
        e2e_ms: ``recommend`` call -> result (features and retrieval included).
        mode: ``rcllm``, ``prefix`` or ``full``: how the prompt was computed.
        source: ``ranker`` or ``popularity`` (cold-start fallback).
        prompt_tokens: length of the rendered prompt (0 for cold start).
        candidates: what the ranker saw, in the retriever's order (empty for cold start).
        cache: what the KV cache did for this request (:class:`CacheStats`).
        model_version: the ranker that ranked (its registry version where it came from the
            MLflow registry, else its fingerprint); one request never mixes versions.

    Example:
        >>> r = rec.recommend(user_id=1, k=5)
        >>> list(zip(r.item_ids, r.scores)), r.mode, r.ttft_ms
    """

    user_id: int
    item_ids: list[int]
    scores: list[float]
    labels: list[str]
    ttft_ms: float
    e2e_ms: float
    mode: str = "full"
    source: str = "ranker"
    prompt_tokens: int = 0
    candidates: list[int] = field(default_factory=list)
    cache: CacheStats = field(default_factory=CacheStats)
    model_version: str = ""
