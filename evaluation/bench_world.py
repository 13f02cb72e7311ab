"""The benchmarks' synthetic world: a catalog, a seeded request stream, a tokenizer trained on
it, a random-weight model and the template that gives item blocks a target length.

Only numpy, torch, transformers and tokenizers are imported (the benches run on bare GPU machines).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from rcllm_sdk.model.ranker import Ranker
from rcllm_sdk.model.tokenizer import train_tokenizer
from rcllm_sdk.prompt import ItemInfo, PromptTemplate, render
from rcllm_sdk.prompt.encoder import cacheable_blocks

from .bench_config import MODELS, BenchConfig, Request, StreamConfig, Workload


# ---- the synthetic world ---------------------------------------------------------------------
def bench_catalog(n_items: int, description_words: int, seed: int) -> dict[int, ItemInfo]:
    """Items with pseudo-word titles and category-specific description text (numpy only)."""
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ra", "ten", "vo", "shi", "dun", "pel", "qua", "zor", "bel", "nim", "tor"]

    def word():
        return "".join(rng.choice(syllables, rng.integers(2, 4)))

    categories = [f"Genre{c}" for c in range(12)]
    vocab = [[word() for _ in range(60)] for _ in categories]
    catalog = {}
    for item in range(1, n_items + 1):
        cat = int(rng.integers(len(categories)))
        title = " ".join(word().capitalize() for _ in range(rng.integers(2, 4)))
        text = " ".join(rng.choice(vocab[cat], description_words))
        catalog[item] = ItemInfo(item, title, categories[cat], text)
    return catalog


def request_stream(config: StreamConfig, workload: Workload, n: int, salt: int) -> list[Request]:
    """``n`` requests: new users with ``history`` items, or repeat users whose history grew."""
    rng = np.random.default_rng([config.seed, salt])
    weights = 1.0 / np.arange(1, config.items + 1) ** config.zipf_exponent
    popularity = rng.permutation(weights / weights.sum())  # which items are popular is random

    def draw(k, seen):
        return _zipf_unseen(rng, popularity, k, seen)

    histories: dict[int, list[int]] = {}
    requests = []
    while len(requests) < n:
        if histories and rng.random() < config.repeat_user_rate:
            user = int(rng.choice(list(histories)))
            grow = int(rng.integers(config.history_growth[0], config.history_growth[1] + 1))
            histories[user] = histories[user] + draw(grow, set(histories[user]))
        else:
            user = len(histories) + 1
            histories[user] = draw(workload.history, set())
        history = histories[user][-workload.history :]
        requests.append(Request(user, history, draw(workload.candidates, set(histories[user]))))
    return requests


def render_requests(requests: list[Request], catalog, template: PromptTemplate, ranker) -> list:
    """The prompt of each request."""
    return [
        render(
            [catalog[i] for i in r.history],
            [catalog[i] for i in r.candidates],
            template,
            ranker.tokenizer,
            ranker.fingerprint,
        )
        for r in requests
    ]


def request_blocks(requests: list[Request], catalog, template: PromptTemplate, ranker) -> list:
    """What the refresh pipeline keeps stored for these requests: the system block, each
    history block and each candidate's item block."""
    return cacheable_blocks(
        [[catalog[i] for i in r.history] for r in requests],
        [catalog[i] for i in sorted({i for r in requests for i in r.candidates})],
        template,
        ranker.tokenizer,
        ranker.fingerprint,
    )


def _zipf_unseen(rng, popularity: np.ndarray, k: int, seen: set[int]) -> list[int]:
    p = popularity.copy()
    p[[i - 1 for i in seen]] = 0.0
    return [int(i) + 1 for i in rng.choice(len(p), size=k, replace=False, p=p / p.sum())]


# ---- model, tokenizer, template --------------------------------------------------------------
def build_bench_ranker(
    config: BenchConfig, workloads: list[Workload]
) -> tuple[Ranker, dict[str, PromptTemplate], dict]:
    """Tokenizer trained on the catalog, random-weight model, one template per workload."""
    longest = max(w.item_tokens for w in workloads)
    catalog = bench_catalog(config.stream.items, 2 * longest, config.stream.seed)
    base = PromptTemplate(max_history=max(w.history for w in workloads), item_text_words=longest)
    texts = [
        base.item_line(i.item_id, i.title, i.category, i.text, True) for i in list(catalog.values())[:1500]
    ]
    tokenizer = train_tokenizer([t.split(">", 1)[1] for t in texts], catalog.keys(), base, vocab_size=4000)
    templates = {w.name: _template_for(w, catalog, tokenizer) for w in workloads}
    spec = dict(MODELS[config.model])
    family = spec.pop("family")
    model = _random_model(family, spec, len(tokenizer), tokenizer, config)
    digest = hashlib.blake2b(
        json.dumps([config.model, spec, config.stream.seed]).encode(), digest_size=8
    ).hexdigest()
    return Ranker(model, tokenizer, base, f"bench{digest}"), templates, catalog


def _template_for(workload: Workload, catalog, tokenizer) -> PromptTemplate:
    """Pick the description length that makes item blocks about ``item_tokens`` long."""
    sample = list(catalog.values())[:200]
    words = workload.item_tokens
    for _ in range(4):
        template = PromptTemplate(max_history=workload.history, item_text_words=words)
        lines = [template.item_line(i.item_id, i.title, i.category, i.text, True) for i in sample]
        mean = np.mean([len(ids) for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]])
        words = max(1, int(round(words * workload.item_tokens / mean)))
    return PromptTemplate(max_history=workload.history, item_text_words=words)


def _random_model(family: str, spec: dict, vocab: int, tokenizer, config: BenchConfig):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[family]
    torch.manual_seed(config.stream.seed)
    hf_config = config_cls(
        vocab_size=vocab,
        max_position_embeddings=16384,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **spec,
    )
    dtype = _dtype(config)
    model = model_cls(hf_config).to(device=config.device, dtype=dtype)
    model.config._attn_implementation = "sdpa"
    return model.eval()


def _dtype(config: BenchConfig) -> torch.dtype:
    if config.dtype == "auto":
        return torch.bfloat16 if config.device.startswith("cuda") else torch.float32
    return getattr(torch, config.dtype)
