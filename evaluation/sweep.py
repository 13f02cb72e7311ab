"""``rcllm bench --sweep``: TTFT over item-block lengths x candidate counts, and a profile of
a short prompt's fixed cost.

Each point renders prompts whose item blocks are about ``tokens`` long (the shortest are an
item token and a category, then a title, then description words) with ``candidates`` items
and a user block of ``history`` items, warms the cache as ``rcllm bench`` does (every block
stored; each user's system+history prefix stored for ``prefix``), then times interleaved:

    full     the plain Hugging Face forward over the whole prompt
    prefix   prefix caching
    rcllm    the serving engine as configured (its guard may run full prefill)
    reuse    the engine with the guard off: block reuse always
    floor    the plain forward over only the tokens reuse recomputes: reuse with no fixed cost
"""

from __future__ import annotations

import numpy as np

from rcllm_sdk.model.ranker import Ranker
from rcllm_sdk.model.scoring import score_full
from rcllm_sdk.model.tokenizer import label_token_ids
from rcllm_sdk.prompt import PromptTemplate
from rcllm_sdk.runtime.engine import BlockEngine
from rcllm_sdk.runtime.policies import parse_policy
from rcllm_sdk.runtime.profile import Profile
from rcllm_sdk.runtime.profile import markdown as profile_markdown

from .bench_config import BenchConfig, SweepConfig, Workload
from .bench_world import render_requests, request_stream

MODES = ("full", "prefix", "rcllm", "reuse", "floor")
COMPACT = (  # item lines from shortest up: item token; + category; + title (then description words)
    dict(titles=False, categories=False),
    dict(titles=False, categories=True),
    dict(titles=True, categories=True),
)


def sweep_template(tokens: int, history: int, catalog: dict, tokenizer) -> PromptTemplate:
    """The template whose item blocks come closest to ``tokens`` tokens on average."""
    sample = list(catalog.values())[:200]

    def mean_length(template: PromptTemplate) -> float:
        lines = [template.item_line(i.item_id, i.title, i.category, i.text, True) for i in sample]
        return float(np.mean([len(ids) for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]]))

    options = [PromptTemplate(max_history=history, **c) for c in COMPACT]
    titled = mean_length(options[-1])
    words = max(1, round(tokens - titled))
    for _ in range(4):  # description words: about one token each; refine on the measured mean
        described = PromptTemplate(max_history=history, item_text_words=words)
        words = max(1, round(words * (tokens - titled) / max(mean_length(described) - titled, 1.0)))
    options.append(PromptTemplate(max_history=history, item_text_words=words))
    return min(options, key=lambda t: (abs(mean_length(t) - tokens), -mean_length(t)))


def run_sweep(config: BenchConfig, ranker: Ranker, catalog: dict, store, helpers, progress: bool) -> dict:
    """``{"sweep": [row per point], "profile": {...}}``; ``helpers`` are bench's warm/measure steps."""
    sweep = config.sweep
    engine = BlockEngine(ranker, store, config.policy, config.attention, guard=config.guard)
    reuse = BlockEngine(ranker, store, config.policy, config.attention, guard=False)
    rows, points = [], [(t, k) for t in sweep.tokens for k in sweep.candidates]
    try:
        for salt, (tokens, candidates) in enumerate(points):
            row = _point(engine, reuse, ranker, catalog, store, helpers, config, tokens, candidates, salt)
            rows.append(row)
            if progress:
                print(_row_line(row), flush=True)
        profile = _profile(reuse, ranker, catalog, store, helpers, config)
    finally:
        engine.close()
        reuse.close()
    return {"sweep": rows, "profile": profile, "cost_model": _cost_model(engine)}


def _point(engine, reuse, ranker, catalog, store, helpers, config, tokens, candidates, salt) -> dict:
    sweep: SweepConfig = config.sweep
    template = sweep_template(tokens, sweep.history, catalog, ranker.tokenizer)
    prompts, labels, requests = _prompts(ranker, catalog, template, candidates, sweep, config, salt)
    for e in (engine, reuse):
        e.ranker = Ranker(ranker.model, ranker.tokenizer, template, ranker.fingerprint)
    runners, guarded = _runners(engine, reuse, config)
    helpers.warmup([engine, reuse], runners, prompts[0], labels[0], store, config.device)
    helpers.prepare_warm(engine, prompts, template, ranker, requests, catalog, False)
    modes = helpers.measure(
        [engine, reuse], prompts, labels, runners, {}, store, config.device, False, lambda i, n: None
    )
    return {
        "tokens_per_item": float(
            np.mean([len(b.token_ids) for p in prompts for b in p.blocks if b.kind == "item"])
        ),
        "target_tokens_per_item": tokens,
        "candidates": candidates,
        "prompt_tokens": float(np.median([len(p.input_ids) for p in prompts])),
        "requests": len(prompts),
        "ttft_ms_p50": {m: modes[m]["ttft_ms_p50"] for m in MODES},
        "ttft_ms_p95": {m: modes[m]["ttft_ms_p95"] for m in MODES},
        "recomputed": modes["reuse"]["recompute_fraction"],
        "guard_full_share": float(np.mean(guarded[-len(prompts) :])) if guarded else 0.0,
        "rcllm_over_full": modes["rcllm"]["ttft_ms_p50"] / modes["full"]["ttft_ms_p50"],
        "reuse_over_full": modes["reuse"]["ttft_ms_p50"] / modes["full"]["ttft_ms_p50"],
    }


def _prompts(ranker, catalog, template, candidates, sweep, config, salt):
    workload = Workload(f"sweep{salt}", candidates, 0, history=sweep.history)
    requests = request_stream(config.stream, workload, sweep.requests, 1000 + salt)
    prompts = render_requests(requests, catalog, template, ranker)
    labels = [label_token_ids(ranker.tokenizer, template.labels[:candidates])] * len(prompts)
    return prompts, labels, requests


def _runners(engine: BlockEngine, reuse: BlockEngine, config: BenchConfig):
    """Mode -> ``fn(prompt, labels) -> (recomputed, prefix hit, kv bytes, misses)``; and the guard's
    decisions of the ``rcllm`` runs (1 = full prefill)."""
    model, pad = engine.ranker.model, engine.ranker.tokenizer.pad_token_id
    policy, guarded = parse_policy(config.policy), []

    def full(prompt, labels):
        score_full(model, [prompt.input_ids], [labels], pad)
        return 1.0, 0.0, 0, 0

    def prefix(prompt, labels):
        c = engine.score_prefix([prompt], [labels])[0].cache
        return c.recomputed_fraction, 1.0 - c.recomputed_fraction, c.kv_bytes_read, c.misses

    def scorer(which: BlockEngine, record: bool):
        def run(prompt, labels):
            c = which.score([prompt], [labels], policy)[0].cache
            if record:
                guarded.append(int(c.fallback_full))
            return c.recomputed_fraction, 0.0, c.kv_bytes_read, c.misses

        return run

    def floor(prompt, labels):
        kinds, lengths = [b.kind for b in prompt.blocks], [len(b.token_ids) for b in prompt.blocks]
        ids = prompt.input_ids
        selected = [
            ids[i] for start, end in policy.selected_ranges(kinds, lengths) for i in range(start, end)
        ]
        score_full(model, [selected], [labels], pad)
        return len(selected) / len(ids), 0.0, 0, 0

    runners = {"full": full, "prefix": prefix, "rcllm": scorer(engine, True), "reuse": scorer(reuse, False)}
    runners["floor"] = floor
    return runners, guarded


def _profile(reuse: BlockEngine, ranker, catalog, store, helpers, config: BenchConfig) -> dict:
    """Stage times of pure reuse at the shortest swept item length with 20 candidates."""
    sweep: SweepConfig = config.sweep
    tokens = min(sweep.tokens)
    template = sweep_template(tokens, sweep.history, catalog, ranker.tokenizer)
    shape = SweepConfig(requests=sweep.profile_requests, history=sweep.history)
    prompts, labels, requests = _prompts(ranker, catalog, template, 20, shape, config, 999)
    reuse.ranker = Ranker(ranker.model, ranker.tokenizer, template, ranker.fingerprint)
    helpers.prepare_warm(reuse, prompts, template, ranker, requests, catalog, False)
    reuse.score([prompts[0]], [labels[0]])  # untimed: first-call allocations
    profile = Profile()
    profile.attach(reuse)
    try:
        for prompt, label in zip(prompts, labels, strict=True):
            profile.request(lambda p=prompt, y=label: reuse.score([p], [y]))
    finally:
        profile.detach(reuse)
    out = profile.report()
    out.update(
        target_tokens_per_item=tokens,
        candidates=20,
        prompt_tokens=float(np.median([len(p.input_ids) for p in prompts])),
    )
    return out


def _cost_model(engine: BlockEngine) -> dict | None:
    return engine.cost_model.to_dict() if engine.cost_model is not None else None


def _row_line(row: dict) -> str:
    p50 = row["ttft_ms_p50"]
    return (
        f"sweep {row['target_tokens_per_item']:>3} tok x {row['candidates']:>2}: "
        + " ".join(f"{m} {p50[m]:.1f}" for m in MODES)
        + f" ms  rcllm/full {row['rcllm_over_full']:.2f}"
    )


def markdown(result: dict) -> str:
    """The sweep table (p50 ms per mode, rcllm / full) and the profile table."""
    lines = [
        "| tokens/item | K | prompt tokens | full | prefix | rcllm | reuse | floor | recomputed "
        "| guard full | rcllm / full | reuse / full |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["sweep"]:
        p50 = r["ttft_ms_p50"]
        lines.append(
            f"| {r['tokens_per_item']:.1f} | {r['candidates']} | {r['prompt_tokens']:.0f} | "
            + " | ".join(f"{p50[m]:.2f}" for m in MODES)
            + f" | {r['recomputed']:.3f} | {r['guard_full_share']:.0%} | {r['rcllm_over_full']:.2f}x "
            f"| {r['reuse_over_full']:.2f}x |"
        )
    profile = result["profile"]
    lines += [
        "",
        f"Profile of pure reuse, {profile['target_tokens_per_item']} tokens/item x {profile['candidates']} "
        f"candidates ({profile['prompt_tokens']:.0f} prompt tokens, {profile['requests']} requests):",
        "",
        profile_markdown(profile),
    ]
    return "\n".join(lines)
