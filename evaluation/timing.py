"""Warm-request TTFT of the serving modes, measured the way ``rcllm bench`` measures warm requests.

Every timed prompt is new to the engine that scores it: each cached mode gets a fresh recommender
(its own store), filled beforehand with what a deployment keeps stored — for ``rcllm`` what the
refresh pipeline precomputes (the system block, every candidate's item block and the timed users'
history blocks), for ``prefix`` what a prefix cache keeps from a user's earlier requests (the
system block and the user's history block as a token prefix, in ``prefix_chunk`` chunks). Neither
holds a prompt it is then timed on. Each user is served once per mode, the modes in rotating order
so that none always runs first; one untimed request per mode warms allocators and thread pools.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from rcllm_sdk.prompt.renderer import ITEM, SYSTEM, USER
from rcllm_sdk.recommender import RcRecommender
from rcllm_sdk.runtime.refresh import refresh_blocks

CACHED = (SYSTEM, USER, ITEM)  # what refresh precomputes; label and query blocks are always computed


def time_modes(
    modes: dict[str, RcRecommender],
    users: list[int],
    warmup_user: int | None,
    ttft_samples: dict[str, list[float]] | None = None,
) -> dict:
    """``{mode name: timing figures}`` over ``users``; ``modes`` map names to recommenders whose
    stores hold nothing yet (``full`` ones need none). ``warmup_user`` (not among ``users``) is served
    once per mode, untimed, before the warm state is prepared (None: the first user, then not timed).
    ``ttft_samples``, when given, receives every timed request's TTFT per mode (for plots)."""
    if warmup_user is None:
        warmup_user, users = users[0], users[1:]
    for rec in modes.values():
        rec.recommend(warmup_user)
    for rec in modes.values():
        prepare_warm(rec, users)
    samples = {name: ([], [], []) for name in modes}
    names = list(modes)
    for n, user in enumerate(users):
        for name in names[n % len(names) :] + names[: n % len(names)]:
            result = modes[name].recommend(user)
            for values, value in zip(samples[name], _figures(result), strict=True):
                values.append(value)
    if ttft_samples is not None:
        ttft_samples.update({name: values[0] for name, values in samples.items()})
    return {name: summarize_timing(*values) for name, values in samples.items()}


def _figures(result) -> tuple[float, float, float]:
    """TTFT, end-to-end latency and the share of the prompt computed (full prefill: all of it)."""
    computed = result.cache.recomputed_fraction if result.mode != "full" else 1.0
    return result.ttft_ms, result.e2e_ms, computed


def prepare_warm(rec: RcRecommender, users: list[int]) -> None:
    """Store what serving keeps between requests for ``users`` (module docstring); no-op in full mode."""
    if rec.engine is None:
        return
    prompts = rec._prompts([h for h, _ in rec.features.histories(users) if h])
    if rec.config.mode == "prefix":
        for prompt in prompts:
            end = next(b.end for b in prompt.blocks if b.kind == USER)
            rec.engine.store_prefix(prompt.input_ids[:end])
    else:
        kept = {b.content_hash: replace(b, start=0) for p in prompts for b in p.blocks if b.kind in CACHED}
        refresh_blocks(rec.engine, list(kept.values()), progress=False)
    rec.engine.flush()


def summarize_timing(ttft: list[float], e2e: list[float], computed: list[float]) -> dict:
    """p50/p95 (p99 from 100 samples) of TTFT and end-to-end latency, in ms, and the mean share of
    each timed prompt that was computed rather than read from the store."""
    out = {"timing_samples": len(ttft), "timing_computed_fraction": float(np.mean(computed))}
    for name, values in (("ttft_ms", ttft), ("e2e_ms", e2e)):
        out[f"{name}_p50"] = float(np.percentile(values, 50))
        out[f"{name}_p95"] = float(np.percentile(values, 95))
        if len(values) >= 100:
            out[f"{name}_p99"] = float(np.percentile(values, 99))
    return out
