"""Serve a random-weight model through the public API, ``RcRecommender.from_frames``, and check the
modes against each other (``evaluation/gpu_check.sh``'s ``frames`` step; CPU at toy size in tests).

Checks, on a synthetic catalog with a YAML-style template (title, category, description; ``(A)``
labels), in-memory features and the ``memory://`` store, warm cache:

* bf16: ``policy="full"`` agrees with ``mode="full"`` on every user's top-1 item whose score
  margin in ``full`` (top-1 minus top-2) is above ``BF16_MARGIN``.
* fp32: as the CPU tests check every mode (``tests/test_byo_models.py``): ``policy="full"`` and
  ``prefix`` give ``full``'s scores (max abs difference under ``FP32_TOLERANCE``); the default
  policy serves the same candidates and prompt lengths, reuses cached blocks, and its top-1
  agreement with ``full`` is reported (random weights: an approximation, not asserted).
* TTFT p50 of the default policy, ``prefix`` and ``full`` (bf16 on CUDA, fp32 elsewhere) on users
  new to the store whose candidates' blocks are cached; the ratios are printed.

Runs with only torch, transformers (and triton on CUDA): no Feast, polars, scipy or LMCache.

    python -m rcllm_sdk.evaluation.frames_check --device cuda --out OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from rcllm_sdk.model.ranker import Ranker
from rcllm_sdk.model.tokenizer import train_tokenizer
from rcllm_sdk.prompt.template_file import template_from_mapping
from rcllm_sdk.runtime.policies import DEFAULT_POLICY

from .bench_config import MODELS
from .bench_world import bench_catalog

BF16_MARGIN = 0.05
FP32_TOLERANCE = {"cpu": 1e-4, "cuda": 1e-3}  # CUDA kernels sum in another order than the CPU's
TEMPLATE = {
    "item_fields": [
        {"name": "title"},
        {"name": "category", "format": "({value})"},
        {"name": "text", "max_words": 24, "history": False},
    ],
    "field_separator": " ",
    "history_length": 20,
    "instruction": "You rank candidate items for a user from the items the user consumed.",
    "label_format": "({label}) ",
    "labels": "uppercase",
}


def frames_world(users: int, items: int, history: int, seed: int = 0) -> tuple[dict, dict]:
    """``(users, items)`` as ``from_frames`` takes them: random walks over a synthetic catalog in
    which an item tends to be followed by one of its few neighbours."""
    catalog = bench_catalog(items, 48, seed)
    rng = np.random.default_rng(seed)
    neighbours = rng.integers(1, items + 1, size=(items + 1, 4))
    walks = {}
    for user in range(1, users + 1):
        walk = [int(rng.integers(1, items + 1))]
        while len(walk) < history:
            step = neighbours[walk[-1], rng.integers(4)] if rng.random() < 0.8 else rng.integers(1, items + 1)
            walk.append(int(step))
        walks[user] = walk
    frames = {i: {"title": c.title, "category": c.category, "text": c.text} for i, c in catalog.items()}
    return walks, frames


def random_ranker(model: str, items: dict, device: str, dtype: torch.dtype, seed: int = 0) -> Ranker:
    """A random-weight ``MODELS[model]`` causal LM with a BPE tokenizer trained on the catalog."""
    from transformers import AutoConfig, AutoModelForCausalLM

    template = template_from_mapping(TEMPLATE)
    texts = [f"{row['title']} ({row['category']}) {row['text']}" for row in items.values()]
    tokenizer = train_tokenizer(texts, [], template, vocab_size=4000)
    spec = dict(MODELS[model])
    family = spec.pop("family")
    extra = {"use_sliding_window": False} if family == "qwen2" else {}
    config = AutoConfig.for_model(
        family,
        vocab_size=len(tokenizer),
        max_position_embeddings=8192,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **spec,
        **extra,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return Ranker(lm.eval(), tokenizer, template, f"frames-check-{model}-{seed}")


def served(ranker: Ranker, users: dict, items: dict, device: str, dtype: str, **config):
    """A recommender over the in-memory frames (store ``memory://``, reuse guard off)."""
    from rcllm_sdk import RcRecommender

    settings = dict(candidates=20, guard=False, device=device, dtype=dtype) | config
    return RcRecommender.from_frames(users, items, model=ranker, **settings)


def warm(rec, users: list[int]) -> list:
    """Recommendations of ``users`` after a first request stored their blocks (all candidates)."""
    rec.recommend_batch(users, k=rec.config.candidates)
    return rec.recommend_batch(users, k=rec.config.candidates)


def check_bf16(ranker: Ranker, users: dict, items: dict, device: str) -> dict:
    """``policy="full"`` vs ``mode="full"`` top-1 where ``full``'s margin exceeds ``BF16_MARGIN``."""
    ids = list(users)
    with served(ranker, users, items, device, "bfloat16", policy="full") as rec:
        exact = warm(rec, ids)
        with rec.with_config(mode="full") as full_rec:
            full = full_rec.recommend_batch(ids, k=rec.config.candidates)
    margins = [r.scores[0] - r.scores[1] for r in full]
    clear = [n for n, m in enumerate(margins) if m > BF16_MARGIN]
    disagree = [ids[n] for n in clear if exact[n].item_ids[0] != full[n].item_ids[0]]
    return {
        "users": len(ids),
        "clear_margin_users": len(clear),
        "top1_disagreements_with_clear_margin": disagree,
        "top1_agreement_all": float(
            np.mean([a.item_ids[0] == b.item_ids[0] for a, b in zip(exact, full, strict=True)])
        ),
        "max_abs_score_diff": _max_diff(exact, full),
        "passed": not disagree and bool(clear),
    }


def check_fp32(ranker: Ranker, users: dict, items: dict, device: str) -> dict:
    """Exact modes equal ``full`` within tolerance; the default policy serves the same prompts."""
    ids = list(users)
    with served(ranker, users, items, device, "float32", mode="full") as full_rec:
        full = full_rec.recommend_batch(ids, k=full_rec.config.candidates)
        runs = {}
        for name, overrides in {
            "rcllm:full": dict(mode="rcllm", policy="full"),
            "prefix": dict(mode="prefix"),
            DEFAULT_POLICY: dict(mode="rcllm", policy=DEFAULT_POLICY),
        }.items():
            with full_rec.with_config(store="memory://", **overrides) as rec:
                runs[name] = warm(rec, ids)
    tolerance = FP32_TOLERANCE[torch.device(device).type]
    diffs = {name: _max_diff(runs[name], full) for name in runs}
    default = runs[DEFAULT_POLICY]
    same_prompts = all(
        a.candidates == b.candidates and a.prompt_tokens == b.prompt_tokens
        for a, b in zip(default, full, strict=True)
    )
    reused = all(r.cache.hits > 0 and r.cache.recomputed_fraction < 1.0 for r in default)
    return {
        "tolerance": tolerance,
        "max_abs_score_diff": diffs,
        "default_policy_top1_agreement": float(
            np.mean([a.item_ids[0] == b.item_ids[0] for a, b in zip(default, full, strict=True)])
        ),
        "default_policy_same_prompts": same_prompts,
        "default_policy_reused_blocks": reused,
        "passed": diffs["rcllm:full"] < tolerance and diffs["prefix"] < tolerance and same_prompts and reused,
    }


def ttft(ranker: Ranker, users: dict, items: dict, device: str, dtype: str) -> dict:
    """Warm TTFT p50 per mode on users new to the store (their candidates' blocks cached)."""
    ids = list(users)
    seen, timed = ids[: len(ids) // 2], ids[len(ids) // 2 :]
    p50 = {}
    with served(ranker, users, items, device, dtype, mode="full") as full_rec:
        for name, overrides in {
            "full": dict(mode="full"),
            "prefix": dict(mode="prefix"),
            "rcllm": dict(mode="rcllm", policy=DEFAULT_POLICY),
        }.items():
            with full_rec.with_config(store="memory://", batch_size=1, **overrides) as rec:
                rec.recommend_batch(seen, k=1)  # caches the system and the catalog's popular item blocks
                p50[name] = statistics.median(rec.recommend(u, k=1).ttft_ms for u in timed)
    return {
        "dtype": dtype,
        "ttft_p50_ms": p50,
        "rcllm_vs_prefix": p50["prefix"] / p50["rcllm"],
        "rcllm_vs_full": p50["full"] / p50["rcllm"],
    }


def run_check(model: str, device: str, users: int, items: int, history: int = 20) -> dict:
    """Every check of the module docstring; ``report["passed"]`` is their conjunction."""
    walks, frames = frames_world(users, items, history)
    bf16_ranker = random_ranker(model, frames, device, torch.bfloat16)
    bf16 = check_bf16(bf16_ranker, walks, frames, device)
    fp32_ranker = random_ranker(model, frames, device, torch.float32)
    fp32 = check_fp32(fp32_ranker, walks, frames, device)
    on_cuda = torch.device(device).type == "cuda"
    timing = ttft(
        bf16_ranker if on_cuda else fp32_ranker, walks, frames, device, "bfloat16" if on_cuda else "float32"
    )
    return {
        "model": model,
        "device": device,
        "bf16": bf16,
        "fp32": fp32,
        "ttft": timing,
        "passed": bf16["passed"] and fp32["passed"],
    }


def _max_diff(a: list, b: list) -> float:
    """Largest score difference of the same item between two runs over the same users."""
    diffs = [
        abs(x[i] - y[i])
        for ra, rb in zip(a, b, strict=True)
        for x, y in [
            (dict(zip(ra.item_ids, ra.scores, strict=True)), dict(zip(rb.item_ids, rb.scores, strict=True)))
        ]
        for i in x
    ]
    return max(diffs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen-0.5b", choices=sorted(MODELS), help="random-weight shape")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--users", type=int, default=64)
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--out", type=Path, help="folder for frames_check.json")
    args = p.parse_args(argv)
    report = run_check(args.model, args.device, args.users, args.items)
    timing = report["ttft"]
    print(json.dumps({k: report[k] for k in ("bf16", "fp32")}, indent=2))
    print(
        f"TTFT p50 ({timing['dtype']}, {args.model} on {args.device}): "
        + ", ".join(f"{m} {v:.1f} ms" for m, v in timing["ttft_p50_ms"].items())
        + f"; rcllm vs prefix {timing['rcllm_vs_prefix']:.2f}x, vs full {timing['rcllm_vs_full']:.2f}x"
    )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "frames_check.json").write_text(json.dumps(report, indent=2))
    print("frames check", "passed" if report["passed"] else "FAILED")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
