"""Unit costs of the serving simulator (``evaluation/simulate.py``), timed here on a repo's ranker:
``rcllm bench`` times random-weight presets only, so the per-token, per-byte and per-block costs
are timed in process through the serving engine with bench's stage profile."""

from __future__ import annotations

import numpy as np

from .simulate import Costs, Shape, fit_line

READ, UNPACK = "store read + codec", "unpack + header check + copy to the device"
PER_BLOCK_STAGES = (READ, UNPACK, "assembly (one concat)", "re-rotation (all layers)")


def measure_units(repo: str, bodies: list[dict], requests: int = 12) -> tuple[Costs, Shape, dict]:
    """Time the repo's ranker here (bench only times random-weight models): the plain forward
    over 1/4 to all of a prompt (per-token slope); warm requests of ``bodies``
    profiled with bench's :class:`~rcllm_sdk.runtime.profile.Profile`, over ``memory://`` (the
    per-block stages) and over a redis-server behind a 1-block tier (the per-byte read)."""
    from rcllm_sdk import RcRecommender

    rec = RcRecommender.from_feature_store(repo, store="memory://", mode="full")
    try:
        given = [b.get("candidates") for b in bodies]
        plans = rec.plan([b["user_id"] for b in bodies], 10, given if all(given) else None)
        plans = [p for p in plans if not isinstance(p, Exception) and p.candidates][:requests]
        prompts = rec._render_plans(plans)
        labels = [rec.label_ids[: len(p.candidate_ids)] for p in prompts]
        per_token, forward_ms = _prefill_slope(rec, prompts[0], labels[0])
        local, remote = _warm_profiles(rec, prompts, labels)
    finally:
        rec.close()
    hits = max(local["hits"], 1.0)
    per_block = sum(local["stages_ms"].get(s, 0.0) for s in PER_BLOCK_STAGES) / hits
    per_byte = remote["stages_ms"].get(READ, 0.0) / max(remote["kv_bytes"], 1.0)
    fixed = local["total_ms"] - per_token * local["recomputed_tokens"] - per_block * hits
    source = dict(source="in-process timing of the repo's ranker", forward_intercept_ms=forward_ms)
    source |= dict(warm_request_ms=local["total_ms"], fetch_from=remote["url"], profile=local["stages_ms"])
    return (
        Costs(max(fixed, 0.0), 0.0, max(per_token, 0.0), per_byte, per_block),
        _shape(prompts, local),
        source,
    )


def _prefill_slope(rec, prompt, labels, reps: int = 9) -> tuple[float, float]:
    """The plain forward's ms over 1/4 .. all of a prompt's tokens, lengths interleaved (a burst of
    the box's other load spreads over all of them), median per length; ``(slope, intercept)``."""
    import time

    from rcllm_sdk.model.scoring import score_full

    ids, pad = prompt.input_ids, rec.ranker.tokenizer.pad_token_id
    lengths, times = [len(ids) * f // 8 for f in (2, 3, 4, 6, 8)], []
    for _ in range(reps + 1):  # the first round untimed: first-call allocations
        for n in lengths:
            t0 = time.perf_counter()
            score_full(rec.ranker.model, [ids[:n]], [labels], pad)
            times.append((time.perf_counter() - t0) * 1000.0)
    return fit_line(lengths, np.median(np.reshape(times, (reps + 1, -1))[1:], axis=0))


def _warm_profiles(rec, prompts, labels) -> tuple[dict, dict]:
    """The warm profile over ``memory://``, and over a fresh redis-server (if installed)."""
    import shutil

    from rcllm_sdk.cache.local_servers import start_redis

    local = _warm_profile(rec, prompts, labels, "memory://", 0)
    if shutil.which("redis-server") is None:
        return local, local
    server = start_redis()
    try:
        return local, _warm_profile(rec, prompts, labels, server.url, 1)
    finally:
        server.kill()


def _warm_profile(rec, prompts, labels, url: str, tier_blocks: int) -> dict:
    """Store every block (one cold pass) through an engine over ``url``; profile the warm pass."""
    from rcllm_sdk.cache import open_store
    from rcllm_sdk.runtime.engine import BlockEngine
    from rcllm_sdk.runtime.profile import Profile

    c = rec.config
    store = open_store(url, namespace=rec.ranker.fingerprint, tier_blocks=tier_blocks)
    engine = BlockEngine(
        rec.ranker, store, c.policy, c.attention, c.prefix_chunk, guard=False, hot_block_bytes=0
    )
    pairs, profile = list(zip(prompts, labels, strict=True)), Profile()
    try:
        for p, y in [*pairs, pairs[0]]:  # the last: untimed first-call allocations, warm
            engine.score([p], [y])
            engine.flush()
        profile.attach(engine)
        runs = [profile.request(lambda p=p, y=y: engine.score([p], [y])[0].cache) for p, y in pairs]
        profile.detach(engine)
    finally:
        engine.close()
        store.close()
    recomputed = [s.recomputed_fraction * len(p.input_ids) for s, p in zip(runs, prompts, strict=True)]
    out = profile.report() | {"url": url, "recomputed_tokens": float(np.mean(recomputed))}
    return out | {
        "hits": float(np.mean([s.hits for s in runs])),
        "kv_bytes": float(np.mean([s.kv_bytes_read for s in runs])),
    }


def _shape(prompts, local: dict) -> Shape:
    from rcllm_sdk.prompt.renderer import ITEM, USER

    def mean_len(kind):
        return float(np.mean([len(b.token_ids) for p in prompts for b in p.blocks if b.kind == kind]))

    reused = sum(len(b.token_ids) for p in prompts for b in p.blocks if b.kind in (ITEM, USER, "system"))
    prefix = float(np.mean([next(b.end for b in p.blocks if b.kind == USER) for p in prompts]))
    prompt, per_token = float(np.mean([len(p.input_ids) for p in prompts])), local["kv_bytes"] * len(prompts)
    recompute = local["recomputed_tokens"]
    return Shape(mean_len(ITEM), mean_len(USER), prefix, prompt, recompute, per_token / max(reused, 1))
