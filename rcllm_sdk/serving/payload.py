"""The JSON of one recommendation, shared by ``rcllm recommend`` and the HTTP service."""

from __future__ import annotations

from dataclasses import asdict


def recommendation_json(r) -> dict:
    """A :class:`~rcllm_sdk.types.Recommendation` as the JSON object both surfaces return."""
    return {
        "user_id": r.user_id,
        "item_ids": r.item_ids,
        "scores": [round(s, 3) for s in r.scores],
        "labels": r.labels,
        "ttft_ms": round(r.ttft_ms, 2),
        "e2e_ms": round(r.e2e_ms, 2),
        "source": r.source,
        "mode": r.mode,
        "cache": asdict(r.cache),
        "model_version": r.model_version,
    }
