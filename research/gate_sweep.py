"""Accuracy-gate sweep: can a from-scratch ranker learn to beat its retriever, and is there room to?

A benchmark script, not part of the SDK's request path. The GPU half needs only torch,
transformers and numpy (the device machine has no feast/polars/mlflow); the rest uses the package.

``export`` (CPU): ingests the synthetic default when ``--repo`` is not ingested yet, builds
the cross-fitted training examples exactly as ``rcllm train`` does, trains the tokenizer, and
saves token ids of every prompt piece plus the validation users' (cross-fitted candidates) and
test users' (serving retriever, retriever order; identical to the served prompts) candidates::

    python -m research.gate_sweep export --repo /tmp/gate_repo --out bench_out/gate/data.pt

``sweep`` (GPU): trains one round of ``CONFIGS`` as parallel processes on one GPU, each for
``--budget`` seconds (curricula and learning rate follow the fraction of the budget used, or
of ``steps`` when given), evaluates NDCG@10 of the ranker against the retriever's own order on
the same 20 candidates with a paired bootstrap interval, writes ``$OUT/results.json`` and
``$OUT/train.log``::

    python -m research.gate_sweep sweep --round 1 --data bench_out/gate/data.pt --out $OUT --budget 330

``headroom`` (CPU): NDCG@10 of rankers that know the synthetic generator's mechanism, on the
same test candidates (the ceiling any learned ranker can reach), and of a linear ranker over
features every prompt shows, trained on the same examples (what the data can teach)::

    python -m research.gate_sweep headroom --repo /tmp/gate_repo

``itemlm`` (CPU): the same question for a sequence model — a 2-layer Llama over item ids, its
next-item log-probability of each candidate combined with the position (:func:`item_lm_headroom`)::

    python -m research.gate_sweep itemlm --repo /tmp/ml1m_repo --steps 2000

``worlds`` (CPU, synthetic only): the same with items represented by their content (category, part,
hashed series name, popularity) instead of ids, trained on the repo's training split and on other
synthetic worlds (:func:`content_lm_headroom`)::

    python -m research.gate_sweep worlds --repo /tmp/gate_repo --worlds 8 --steps 1500

Terms: a *hint* example's query names the answer ("The user picked <i42>. Which candidate ...
Answer:"), so the model only has to find the label in front of that item; the hint probability holds
at 1 until ``hint_hold`` and anneals to 0 at ``hint_end`` (fractions of training). The *K schedule*
shows each example the truth plus K-1 of its other candidates, K growing from ``k_start`` to 20 at
``k_end`` (from the end of lookup pretraining, when there is one). ``bind``/``cand`` weight the
auxiliary losses of :func:`binding_losses` (``bind_layer``: read the binding after that layer, so a
later layer can use it). Round 3: the *lookup* task (:func:`lookup_batch`) appends item tokens
naming candidates to a prompt, each an isolated query that must predict its candidate's label (round
3 as first run appended (item token, label) pairs that saw each other, and the model learned to copy
answers from earlier pairs instead: NOTEBOOK.md); ``pretrain`` is the fraction of training spent on it
alone; ``mimetic`` starts the attention of layers >= 1 as content matchers, ``label_head`` starts
layer 0 as the label-binding head (``attention_init``), ``theta`` is the RoPE base, ``item_scale``
weighs the co-occurrence part of item-token embeddings, ``seed`` varies init and sampling. Round 4:
the label head, several seeds. Round 5: ``recall_last`` ends each prompt with the user's last item token
(the ranking is read there). Measured results: NOTEBOOK.md, "What the ranker learns"; on CPU, e.g.
``worker --name x --config '{"size": "micro", "steps": 3000, ...}' --budget 1 ...``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

try:
    from research.attention_init import label_head_init, mimetic_init
except ImportError:  # run as a script (the GPU machine has torch, transformers and numpy only)
    from attention_init import label_head_init, mimetic_init

K = 20
HINT = "The user picked {item}. "

# name -> settings; unnamed settings take DEFAULTS. order: "shuffle" (always), "retriever"
# (always retriever order), "retriever_after_hint" (shuffled while hints are shown).
DEFAULTS = dict(
    size="small",
    batch=32,
    lr=2e-3,
    warmup=30,
    order="shuffle",
    hint_hold=0.0,
    hint_end=0.0,
    k_end=0.0,
    k_start=2,
    steps=0,
    bind=0.0,
    cand=0.0,
    bind_layer=0,
    mimetic=0.0,
    theta=10000.0,
    lookup=0.0,
    lookup_pairs=20,
    pretrain=0.0,
    item_scale=1.0,
    label_head=0.0,
    head_copy=0.5,
    seed=0,
    recall_last=False,
)
CONFIGS = {
    "ctrl_shuffle_small": dict(),
    "hint_shuffle_small": dict(hint_hold=0.1, hint_end=0.5),
    "hint_retr_small": dict(hint_hold=0.1, hint_end=0.5, order="retriever_after_hint"),
    "k_shuffle_small": dict(k_end=0.5),
    "hintk_shuffle_small": dict(hint_hold=0.1, hint_end=0.5, k_end=0.3),
    "hintk_shuffle_micro": dict(size="micro", hint_hold=0.1, hint_end=0.5, k_end=0.3),
    "hintk_shuffle_base": dict(size="base", lr=1e-3, hint_hold=0.1, hint_end=0.5, k_end=0.3),
    "hintk_retr_small": dict(hint_hold=0.1, hint_end=0.5, k_end=0.3, order="retriever_after_hint"),
    "hintk_shuffle_small_b128": dict(batch=128, hint_hold=0.1, hint_end=0.5, k_end=0.3),
    "hintk_shuffle_small_lr1e-3": dict(lr=1e-3, hint_hold=0.1, hint_end=0.5, k_end=0.3),
    # round 2: auxiliary losses that supervise the binding directly (see binding_losses). No GPU
    # was lent for this round; bindcand_micro ran on CPU: `worker ... --config '{"size": "micro",
    # "bind": 1, "cand": 1, "steps": 1500}'`.
    "bind_small": dict(bind=1.0),
    "bindcand_small": dict(bind=1.0, cand=1.0),
    "bindcand_retr_small": dict(bind=1.0, cand=1.0, order="retriever"),
    "bindcand_micro": dict(size="micro", bind=1.0, cand=1.0),
    "bindcand_base": dict(size="base", lr=1e-3, bind=1.0, cand=1.0),
    "bindcand_small_b128": dict(batch=128, bind=1.0, cand=1.0),
    "bindcand_hintk_small": dict(bind=1.0, cand=1.0, hint_hold=0.1, hint_end=0.4, k_end=0.2),
    "cand_small": dict(cand=1.0),
    "bindcand_small_bind0.3": dict(bind=0.3, cand=1.0),
    # round 3: break the lookup plateau (see lookup_losses / mimetic_init). A fraction `pretrain` of
    # the budget trains only the dense lookup task, K doubling from 2 each time its CE falls under
    # a quarter of ln K; then ranking in retriever order with the lookup as an auxiliary loss.
    "lookup_mimetic_micro": dict(
        size="micro",
        order="retriever",
        bind=1.0,
        bind_layer=1,
        mimetic=3.0,
        theta=1e6,
        lookup=0.5,
        pretrain=0.6,
    ),
    "lookup_mimetic_small": dict(
        order="retriever", bind=1.0, bind_layer=1, mimetic=3.0, theta=1e6, lookup=0.5, pretrain=0.6
    ),
    "lookup_mimetic_small_lr3e-3_p40": dict(
        order="retriever",
        lr=3e-3,
        bind=1.0,
        bind_layer=1,
        mimetic=3.0,
        theta=1e6,
        lookup=0.5,
        lookup_pairs=40,
        pretrain=0.6,
    ),
    "lookup_mimetic_base": dict(
        size="base",
        lr=1e-3,
        order="retriever",
        bind=1.0,
        bind_layer=1,
        mimetic=3.0,
        theta=1e6,
        lookup=0.5,
        pretrain=0.6,
    ),
    "lookup_mimetic_small_shuffle": dict(
        bind=1.0, bind_layer=1, mimetic=3.0, theta=1e6, lookup=0.5, pretrain=0.6
    ),
    "lookup_default_init_small": dict(order="retriever", bind=1.0, bind_layer=1, lookup=0.5, pretrain=0.6),
    "lookup_default_init_micro": dict(
        size="micro", order="retriever", bind=1.0, bind_layer=1, lookup=0.5, pretrain=0.6
    ),
    # item-token embeddings with a smaller co-occurrence part: candidates the retriever proposes have
    # near-identical co-occurrence vectors, which hides each item's identity from the lookup
    "lookup_mimetic_small_item0.01": dict(
        order="retriever",
        bind=1.0,
        bind_layer=1,
        mimetic=3.0,
        theta=1e6,
        lookup=0.5,
        pretrain=0.6,
        item_scale=0.01,
    ),
    "mimetic_only_small": dict(order="retriever", mimetic=3.0, theta=1e6),
    # round 4: the lookup with isolated queries (round 3's pairs could copy answers from earlier
    # pairs) and layer 0 started as the label-binding head (attention_init.label_head_init); three
    # seeds each, with and without that head
    **{
        f"labelhead_micro_s{seed}": dict(
            size="micro",
            order="retriever",
            bind=1.0,
            bind_layer=1,
            mimetic=3.0,
            theta=1e6,
            lookup=0.5,
            pretrain=0.6,
            item_scale=1e-4,
            label_head=12.0,
            seed=seed,
        )
        for seed in range(3)
    },
    **{
        f"nolabelhead_micro_s{seed}": dict(
            size="micro",
            order="retriever",
            bind=1.0,
            bind_layer=1,
            mimetic=3.0,
            theta=1e6,
            lookup=0.5,
            pretrain=0.6,
            item_scale=1e-4,
            seed=seed,
        )
        for seed in range(3)
    },
    "labelhead_micro3": dict(
        size="micro3",
        order="retriever",
        bind=1.0,
        bind_layer=1,
        mimetic=3.0,
        theta=1e6,
        lookup=0.5,
        pretrain=0.6,
        item_scale=1e-4,
        label_head=12.0,
    ),
    "labelhead_micro3_shuffle": dict(
        size="micro3",
        bind=1.0,
        bind_layer=1,
        mimetic=3.0,
        theta=1e6,
        lookup=0.5,
        pretrain=0.6,
        item_scale=1e-4,
        label_head=12.0,
    ),
    # the ranking loss with its own K schedule (2 -> 20 over the ranking phase) after the lookup
    "labelhead_micro3_k": dict(
        size="micro3",
        order="retriever",
        bind=1.0,
        bind_layer=1,
        mimetic=3.0,
        theta=1e6,
        lookup=0.5,
        pretrain=0.4,
        item_scale=1e-4,
        label_head=12.0,
        k_end=0.9,
    ),
    "labelhead_micro3_k_shuffle": dict(
        size="micro3",
        bind=1.0,
        bind_layer=1,
        mimetic=3.0,
        theta=1e6,
        lookup=0.5,
        pretrain=0.4,
        item_scale=1e-4,
        label_head=12.0,
        k_end=0.9,
    ),
    "labelhead_small": dict(
        order="retriever",
        bind=1.0,
        bind_layer=1,
        mimetic=3.0,
        theta=1e6,
        lookup=0.5,
        pretrain=0.6,
        item_scale=1e-4,
        label_head=12.0,
    ),
    "labelhead_small_shuffle": dict(
        bind=1.0,
        bind_layer=1,
        mimetic=3.0,
        theta=1e6,
        lookup=0.5,
        pretrain=0.6,
        item_scale=1e-4,
        label_head=12.0,
    ),
    # round 5 (the synthetic world with sequel habits 0.0/0.3): the prompt ends with the user's last
    # item token, so the lookup circuit's query is the item the answer most depends on
    "recall_labelhead_micro3": dict(
        size="micro3",
        order="retriever",
        bind=1.0,
        bind_layer=1,
        mimetic=3.0,
        theta=1e6,
        lookup=0.5,
        pretrain=0.4,
        item_scale=1e-4,
        label_head=12.0,
        recall_last=True,
    ),
    "recall_labelhead_micro3_item0.3": dict(
        size="micro3",
        order="retriever",
        bind=1.0,
        bind_layer=1,
        mimetic=3.0,
        theta=1e6,
        lookup=0.5,
        pretrain=0.4,
        item_scale=0.3,
        label_head=12.0,
        recall_last=True,
    ),
    # no lookup task: the similarity matcher that mimetic init starts layers >= 1 as, queried by the last
    # item and fed with co-occurrence item vectors, is the ranking prior; binding loss keeps layer 0's labels
    "recall_direct_micro3": dict(
        size="micro3",
        order="retriever",
        bind=1.0,
        bind_layer=1,
        mimetic=3.0,
        theta=1e6,
        label_head=12.0,
        recall_last=True,
    ),
}
ROUNDS = {
    1: list(CONFIGS)[:10],
    2: list(CONFIGS)[10:19],
    3: list(CONFIGS)[19:28],
    4: list(CONFIGS)[28:40],
    5: list(CONFIGS)[40:],
}
# name -> (hidden, layers, heads, KV heads, MLP width); micro3 gives layer 0 a second KV head, free for
# content while the label head (attention_init) holds the first
SIZES = {
    "micro": (64, 2, 2, 1, 128),
    "micro3": (64, 3, 2, 2, 128),
    "small": (128, 4, 4, 2, 384),
    "base": (256, 6, 8, 4, 768),
}


# ---------------------------------------------------------------- export (CPU, package)


def export(repo: Path, out: Path) -> None:
    import polars as pl

    from rcllm_sdk.data.split import TEST, TRAIN, VAL, histories
    from rcllm_sdk.ingest import ingest, read_manifest
    from rcllm_sdk.model.tokenizer import label_token_ids, train_tokenizer
    from rcllm_sdk.pipelines.examples import build_examples
    from rcllm_sdk.pipelines.run import catalog_from_repo, cross_fitted_groups
    from rcllm_sdk.pipelines.train import tokenizer_corpus
    from rcllm_sdk.prompt import PromptTemplate, item_token
    from rcllm_sdk.retrieval import Retriever

    if not (repo / "data" / "dataset.json").exists():
        ingest("synthetic", None, repo)
    manifest, catalog, template = read_manifest(repo), catalog_from_repo(repo), PromptTemplate()
    tok = train_tokenizer(tokenizer_corpus(catalog, template), catalog.keys(), template, 4000)
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    item_ids = sorted(catalog)
    dense = {i: n for n, i in enumerate(item_ids)}
    groups = cross_fitted_groups(repo, manifest)
    examples, stats = build_examples(groups, K, max_examples=10**7, seed=0)
    user_ids = lambda hist: ids(template.user_text([catalog[i] for i in hist[-template.max_history :]]))  # noqa: E731

    inter = pl.read_parquet(repo / "data" / "interactions.parquet")
    served = {u: list(s) for u, s, _ in histories(inter, exclude=(TEST,)).iter_rows()}
    train_h = {
        u: list(s) for u, s, _ in histories(inter.filter(pl.col("split") == TRAIN), exclude=()).iter_rows()
    }
    truth = {
        split: dict(inter.filter(pl.col("split") == split).select("user_id", "item_id").iter_rows())
        for split in (VAL, TEST)
    }
    serving = Retriever.load(repo / "data" / "retriever.npz")
    folds = len(groups)

    def users(split, hist, retriever_of):
        rows = []
        for u in sorted(truth[split]):
            cands = retriever_of(u).candidates(hist[u], K)
            t = truth[split][u]
            rows.append((user_ids(hist[u]), [dense[c] for c in cands], cands.index(t) if t in cands else -1))
        return rows

    val = users(VAL, train_h, lambda u: groups[u % folds][1])
    test = users(TEST, served, lambda u: serving)
    prefix, suffix = HINT.split("{item}")
    sample = HINT.format(item=item_token(item_ids[0])) + template.query
    hint_prefix, hint_suffix = ids(prefix), ids(suffix + template.query)
    assert ids(sample) == hint_prefix + ids(item_token(item_ids[0])) + hint_suffix, (
        "hint query does not split"
    )
    train = [(user_ids(e.history), [dense[c] for c in e.candidates], e.target) for e in examples]
    data = {
        "meta": {
            "vocab": len(tok),
            "pad": tok.pad_token_id,
            "bos": tok.bos_token_id,
            "eos": tok.eos_token_id,
            "stats": stats,
            "template": template.to_dict(),
            "hint": HINT,
        },
        "system": ids(template.system),
        "query": ids(template.query),
        "hint_prefix": hint_prefix,
        "hint_suffix": hint_suffix,
        "label_blocks": [ids(template.label_line(x)) for x in template.labels[:K]],
        "label_ids": label_token_ids(tok, template.labels[:K]),
        "item_lines": [
            ids(template.item_line(i, catalog[i].title, catalog[i].category, catalog[i].text, True))
            for i in item_ids
        ],
        "item_tokens": [tok.convert_tokens_to_ids(item_token(i)) for i in item_ids],
        "item_vectors": torch.tensor(np.stack([serving.embeddings[serving.index[i]] for i in item_ids])),
        "train": train,
        "val": val,
        "test": test,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, out)
    hit = lambda rows: np.mean([r[2] >= 0 for r in rows])  # noqa: E731
    print(
        f"exported {len(train)} training examples ({stats}), val {len(val)} (hit {hit(val):.3f}), "
        f"test {len(test)} (hit {hit(test):.3f}) to {out}"
    )


# ---------------------------------------------------------------- headroom (CPU, package)


def headroom(repo: Path, sequel_habits: tuple[float, ...] | None = None, ablate: bool = False) -> None:
    """Test-user NDCG@10 of other rankers vs the retriever on the serving candidates of ``repo``: a
    linear ranker over prompt features (any dataset) and, for the synthetic world (ingested with
    ``sequel_habits``; None: the generator's default), rankers that know its mechanism. ``ablate`` adds
    linear rankers over the position and one content feature each, over the first five and over all
    seven: which features carry the margin."""
    import polars as pl

    from rcllm_sdk.data.split import TEST, histories
    from rcllm_sdk.ingest import read_manifest
    from rcllm_sdk.pipelines.run import catalog_from_repo
    from rcllm_sdk.retrieval import Retriever

    inter = pl.read_parquet(repo / "data" / "interactions.parquet")
    truth = dict(inter.filter(pl.col("split") == TEST).select("user_id", "item_id").iter_rows())
    retriever = Retriever.load(repo / "data" / "retriever.npz")
    catalog = catalog_from_repo(repo)
    sequel_of = _sequels(catalog)
    x, y = linear_training_data(repo, catalog, retriever, sequel_of)
    subsets = {"learned linear": CONTENT_FEATURES[:4]}
    if ablate:
        subsets |= {f"linear, {f} only": (f,) for f in CONTENT_FEATURES}
        subsets |= {"linear, all five": CONTENT_FEATURES[:5], "linear, all seven": CONTENT_FEATURES}
    linear = {name: fit_linear_ranker(x, y, features) for name, features in subsets.items()}
    mechanism = (
        _mechanism_rankers(repo, inter, sequel_habits)
        if read_manifest(repo)["dataset"] == "synthetic"
        else {}
    )
    ranks = {name: [] for name in ("retriever", *mechanism, *linear)}
    for user, hist, _ in histories(inter, exclude=(TEST,)).iter_rows():
        if user not in truth:
            continue
        cands = retriever.candidates(list(hist), K)
        t = cands.index(truth[user]) if truth[user] in cands else -1
        features = _prompt_features(list(hist), cands, catalog, retriever, retriever, sequel_of)
        scores = {name: score(user, list(hist), cands) for name, score in mechanism.items()}
        scores |= {name: features[:, columns] @ w for name, (columns, w) in linear.items()}
        ranks["retriever"].append(t)
        for name, score in scores.items():
            order = np.argsort(-score, kind="stable")
            ranks[name].append(int(np.flatnonzero(order == t)[0]) if t >= 0 else -1)
    base = np.array(ranks.pop("retriever"))
    print(f"retriever NDCG@10 {ndcg10(base).mean():.4f}; truth in candidates {np.mean(base >= 0):.3f}")
    for name, r in ranks.items():
        _print_versus(name, np.array(r), base)


def _print_versus(name: str, ranks: np.ndarray, base: np.ndarray) -> dict:
    """Print and return NDCG@10 of ``ranks`` against the retriever's ``base`` ranks, paired."""
    from rcllm_sdk.evaluation.metrics import paired_difference

    d = paired_difference(ranks, base)
    ranked, baseline = ndcg10(ranks).mean(), ndcg10(base).mean()
    print(
        f"{name}: NDCG@10 {ranked:.4f} vs retriever {baseline:.4f}, diff {d['mean']:+.4f} "
        f"[{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}], relative {ranked / baseline - 1:+.1%}"
    )
    return {
        "ndcg10": float(ranked),
        "retriever_ndcg10": float(baseline),
        "diff": d["mean"],
        "diff_ci": d["ci"],
    }


def _mechanism_rankers(repo: Path, inter, sequel_habits) -> dict:
    """``name -> score(user, history, candidates)`` of rankers that know the synthetic generator's
    mechanism: with each user's true habits (replayed from the generator's draws), with habits
    estimated from the history, and the fixed rule "sequel, then category, then retriever order"."""
    import polars as pl

    from rcllm_sdk.data import synthetic as syn
    from rcllm_sdk.data.split import TRAIN

    cfg = syn.SyntheticConfig(**({"sequel_habits": sequel_habits} if sequel_habits else {}))
    rng = np.random.default_rng(cfg.seed)
    items, series_of, part_of = syn._build_items(cfg, rng)
    cat = np.array([syn._CATEGORIES.index(c) for c in items["category"]])
    popularity = syn._popularity(cfg, rng)
    walker = syn._UserWalker(cat, series_of, part_of, popularity, rng)
    habits = {}
    for user in range(1, cfg.n_users + 1):  # the same draws, in the same order, as synthetic.generate
        pref = rng.dirichlet(np.full(cfg.n_categories, 0.25))
        p_seq, p_stay = syn.user_habits(cfg, rng)
        walker.walk(int(rng.integers(cfg.min_len, cfg.max_len + 1)), pref, p_seq, p_stay)
        rng.integers(0, 86_400 * 30)
        habits[user] = (pref, p_seq, p_stay)
    counts = (
        np.bincount(inter.filter(pl.col("split") == TRAIN)["item_id"].to_numpy() - 1, minlength=len(cat))
        + 1.0
    )
    sequel = walker.sequel  # 0-based item -> its next part, or -1
    dense = lambda hist, cands: ([i - 1 for i in hist], np.array(cands) - 1)  # noqa: E731  ids are 1-based

    def true_habits(user, hist, cands):
        return _next_item_probability(*dense(hist, cands), cat, sequel, popularity, *habits[user])

    def estimated_habits(user, hist, cands):
        h, c = dense(hist, cands)
        return _next_item_probability(h, c, cat, sequel, counts, *_estimated_habits(h, cat, sequel, cfg))

    def rule(user, hist, cands):
        h, c = dense(hist, cands)
        return 2.0 * (c == sequel[h[-1]]) + (cat[c] == cat[h[-1]]) - 0.01 * np.arange(len(c))

    return {
        "true habits": true_habits,
        "estimated habits": estimated_habits,
        "sequel>category>retriever": rule,
    }


def item_lm_headroom(
    repo: Path,
    steps: int,
    window: int = 40,
    batch: int = 64,
    seed: int = 0,
    scored_history: int | None = None,
) -> dict:
    """Is there sequential signal beyond the retriever? Trains a 2-layer Llama over the training
    split's item-id sequences (next-item cross-entropy on windows of ``window`` items, no text),
    scores each test user's served candidates by its next-item log-probability after the last
    ``scored_history`` items (default: ``window``), and combines that with the candidate's position
    in a softmax ranker whose K + 1 weights are fitted on the other half of the test users (2-fold).
    A diagnostic of what a sequence model could add, not a served ranker."""
    import polars as pl

    from rcllm_sdk.data.split import TRAIN, histories
    from rcllm_sdk.retrieval import Retriever

    scored = scored_history or window
    if not 1 <= scored <= window:
        raise ValueError(f"scored_history must be between 1 and the training window ({window}), got {scored}")
    inter = pl.read_parquet(repo / "data" / "interactions.parquet")
    serving = Retriever.load(repo / "data" / "retriever.npz")
    token = {int(i): n + 1 for n, i in enumerate(serving.item_ids)}  # 0 = padding
    train_histories = histories(inter.filter(pl.col("split") == TRAIN), exclude=())["item_ids"]
    train = [[token[i] for i in seq] for seq in train_histories]
    model = _fit_item_lm(train, len(token) + 1, steps, window, batch, seed)
    rows, targets = _served_test_rows(inter, serving)
    logp = np.concatenate(
        [
            _next_item_logp(
                model,
                [[token[i] for i in h[-scored:]] for h, _ in rows[n : n + 256]],
                [[token[i] for i in c] for _, c in rows[n : n + 256]],
            )
            for n in range(0, len(rows), 256)
        ]
    )
    return _print_versus(
        f"item LM ({steps} steps, windows of {window}, last {scored} items scored) + position",
        _two_fold_with_position(logp, targets),
        targets,
    )


def _served_test_rows(inter, serving) -> tuple[list[tuple[list[int], list[int]]], np.ndarray]:
    """``([(history, candidates)], targets)`` of every test user: the history as served (test item
    left out), the serving retriever's top K, and the truth's position among them (-1: missed)."""
    import polars as pl

    from rcllm_sdk.data.split import TEST, histories

    truth = dict(inter.filter(pl.col("split") == TEST).select("user_id", "item_id").iter_rows())
    rows, targets = [], []
    for user, history, _ in histories(inter, exclude=(TEST,)).iter_rows():
        if user in truth:
            candidates = serving.candidates(list(history), K)
            rows.append((list(history), candidates))
            targets.append(candidates.index(truth[user]) if truth[user] in candidates else -1)
    return rows, np.array(targets)


def _two_fold_with_position(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Ranks of the truth under the item-lm recipe's readout (``tau * score + b[position]``, see
    ``item_lm.fit_readout``) fitted on the other half of the users (2-fold); -1 stays a miss."""
    from rcllm_sdk.pipelines.item_lm import fit_readout

    scores = torch.tensor(scores, dtype=torch.float32)
    ranks = targets.copy()
    for fold in (0, 1):
        fit = (np.arange(len(scores)) % 2 != fold) & (targets >= 0)
        tau, bias = fit_readout(scores[fit], torch.tensor(targets[fit]))
        held_out = np.flatnonzero(np.arange(len(scores)) % 2 == fold)
        ranks[held_out] = _ranks(
            tau * scores[held_out] + torch.tensor(bias, dtype=torch.float32), targets[held_out].tolist()
        )
    return ranks


def _fit_item_lm(sequences: list[list[int]], vocab: int, steps: int, window: int, batch: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=window,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        windows = []
        for n in rng.integers(0, len(sequences), batch):
            start = int(rng.integers(0, max(1, len(sequences[n]) - window + 1)))
            windows.append(sequences[n][start : start + window])
        ids = torch.zeros(len(windows), max(map(len, windows)), dtype=torch.long)
        for b, w in enumerate(windows):
            ids[b, : len(w)] = torch.tensor(w)
        loss = model(
            input_ids=ids, attention_mask=(ids > 0).long(), labels=ids.masked_fill(ids == 0, -100)
        ).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


@torch.no_grad()
def _next_item_logp(model, histories: list[list[int]], candidates: list[list[int]]) -> np.ndarray:
    """``[len(histories), K]`` log-probabilities of each candidate as the next item
    (histories left-padded)."""
    width = max(map(len, histories))
    ids = torch.zeros(len(histories), width, dtype=torch.long)
    for b, h in enumerate(histories):
        ids[b, width - len(h) :] = torch.tensor(h)
    mask = (ids > 0).long()
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    logp = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].log_softmax(-1)
    return torch.gather(logp, 1, torch.tensor(candidates)).numpy()


# ---------------------------------------------------------------- content item LM, other synthetic worlds

SERIES_CODE_DIM = 256
MAX_PART = 8  # part numbers above share one embedding


def content_lm_headroom(
    repo: Path,
    steps: int,
    worlds: int,
    layers: int = 2,
    hidden: int = 64,
    batch: int = 64,
    seed: int = 0,
    transitions: str = "none",
) -> dict:
    """Does reading item *content* instead of item ids let a sequence model beat the retriever on the
    synthetic world? An item is its category, its part number, a fixed random code of its series
    name (hashed: no per-item parameter to memorise) and its popularity bucket; a Llama over these
    (:class:`ContentItemLM`) learns next-item prediction (seen items masked) on the repo's training
    split and on ``worlds`` other synthetic worlds (seeds 1000, 1001, ...: other items, titles and
    users, the same generator). Test users' candidates are then scored as in :func:`item_lm_headroom`.
    ``transitions`` ("category" or "both"; "none": off) adds to each item's input whether it stayed in
    the previous item's category and ("both") whether it is the previous item's next part: comparisons
    of adjacent items' content that the model does not learn to make itself (NOTEBOOK.md, "Round 9"). A
    diagnostic, not a served ranker."""
    import polars as pl

    from rcllm_sdk.data import synthetic as syn
    from rcllm_sdk.data.split import TRAIN, histories
    from rcllm_sdk.retrieval import Retriever

    inter = pl.read_parquet(repo / "data" / "interactions.parquet")
    items = pl.read_parquet(repo / "data" / "items.parquet").sort("item_id")
    row = {int(i): n for n, i in enumerate(items["item_id"])}
    train = [
        [row[i] for i in s] for s in histories(inter.filter(pl.col("split") == TRAIN), exclude=())["item_ids"]
    ]
    target = (train, _content_features(items, train))
    corpus = [target]
    for w in range(worlds):
        other, other_items = syn.generate(syn.SyntheticConfig(seed=1000 + w))
        other_items = other_items.sort("item_id")
        other_row = {int(i): n for n, i in enumerate(other_items["item_id"])}
        sequences = [
            [other_row[i] for i in s]
            for s in other.group_by("user_id", maintain_order=True).agg("item_id")["item_id"]
        ]
        corpus.append((sequences, _content_features(other_items, sequences)))
    torch.manual_seed(seed)
    model = _fit_content_lm(corpus, steps, ContentItemLM(layers, hidden, transitions), batch, seed)
    rows, targets = _served_test_rows(inter, Retriever.load(repo / "data" / "retriever.npz"))
    with torch.no_grad():
        scores = np.concatenate(
            [
                model.candidate_scores(
                    [[row[i] for i in h] for h, _ in rows[n : n + 256]],
                    [[row[i] for i in c] for _, c in rows[n : n + 256]],
                    target[1],
                ).numpy()
                for n in range(0, len(rows), 256)
            ]
        )
    alone = np.array(
        [
            _ranks(torch.tensor(s[None]), [t])[0] if t >= 0 else -1
            for s, t in zip(scores, targets, strict=False)
        ]
    )
    name = "content item LM" + ("" if transitions == "none" else f" with {transitions} transitions")
    _print_versus(f"{name} alone", alone, targets)
    return _print_versus(
        f"{name} ({steps} steps, {worlds} other worlds, {layers} layers of {hidden}) + position",
        _two_fold_with_position(scores, targets),
        targets,
    )


def _content_features(items, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    """Per item (rows of ``items``, titled "<Series> Part N"): category index, part number,
    fixed random code of the series name, popularity bucket (tenths of log1p(count) / its max) and
    log1p(count) itself (the generator picks within a category by popularity)."""
    import zlib

    from rcllm_sdk.data.synthetic import _CATEGORIES

    category, part, series = [], [], []
    for title, cat in items.select("title", "category").iter_rows():
        name, _, number = title.rpartition(" Part ")
        category.append(_CATEGORIES.index(cat))
        part.append(int(number))
        series.append(zlib.crc32(name.encode()))
    code = [np.random.default_rng(key).standard_normal(SERIES_CODE_DIM) for key in series]
    log_count = np.log1p(np.bincount(np.concatenate(sequences), minlength=len(items)))
    bucket = np.minimum((10 * log_count / max(log_count.max(), 1e-9)).astype(int), 9)
    return {
        "category": torch.tensor(category),
        "part": torch.tensor(part),
        "popularity": torch.tensor(bucket),
        "series_key": torch.tensor(series),
        "log_count": torch.tensor(log_count, dtype=torch.float32)[:, None],
        "series": torch.tensor(np.stack(code) / SERIES_CODE_DIM**0.5, dtype=torch.float32),
    }


class ContentItemLM(torch.nn.Module):
    """A Llama over items represented by their content: input and output embeddings are sums of
    category, part and popularity embeddings and a linear map of the series code; the output bias is
    a popularity-bucket term plus a learned multiple of log1p(count)."""

    def __init__(self, layers: int, hidden: int, transitions: str = "none"):
        from transformers import LlamaConfig, LlamaModel

        from rcllm_sdk.data.synthetic import _CATEGORIES

        super().__init__()
        self.llama = LlamaModel(
            LlamaConfig(
                vocab_size=8,
                hidden_size=hidden,
                intermediate_size=2 * hidden,
                num_hidden_layers=layers,
                num_attention_heads=4,
                num_key_value_heads=4,
                max_position_embeddings=64,
                rope_theta=1e6,
            )
        )
        self.sides = torch.nn.ModuleList(
            torch.nn.ModuleDict(
                {
                    "category": torch.nn.Embedding(len(_CATEGORIES), hidden),
                    "part": torch.nn.Embedding(MAX_PART + 1, hidden),
                    "popularity": torch.nn.Embedding(10, hidden),
                    "series": torch.nn.Linear(SERIES_CODE_DIM, hidden, bias=False),
                }
            )
            for _ in range(2)
        )
        self.output_bias = torch.nn.Embedding(10, 1)
        self.log_count_weight = torch.nn.Parameter(torch.zeros(1))
        if transitions not in ("none", "category", "both"):
            raise ValueError(f"transitions must be none, category or both, got {transitions!r}")
        self.sequels = transitions == "both"
        self.transition = (
            torch.nn.Embedding(5, hidden) if transitions != "none" else None
        )  # 0: no previous item
        for side in self.sides:
            for name in ("category", "part", "popularity"):
                torch.nn.init.normal_(side[name].weight, std=0.1)

    def tables(self, f: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, outputs)``: ``[items, hidden + 1]`` each; the last column is the output bias."""
        inputs, outputs = (
            side["category"](f["category"])
            + side["part"](f["part"].clamp(max=MAX_PART))
            + side["popularity"](f["popularity"])
            + side["series"](f["series"])
            for side in self.sides
        )
        bias = self.output_bias(f["popularity"]) + self.log_count_weight * f["log_count"]
        return torch.cat([inputs, torch.ones_like(bias)], 1), torch.cat([outputs, bias], 1)

    def states(
        self, sequences: list[list[int]], f: dict, inputs: torch.Tensor, left_pad: bool = False
    ) -> torch.Tensor:
        width = max(map(len, sequences))
        ids = torch.zeros(len(sequences), width, dtype=torch.long)
        mask, codes = torch.zeros_like(ids), torch.zeros_like(ids)
        for b, s in enumerate(sequences):
            span = slice(width - len(s), width) if left_pad else slice(0, len(s))
            ids[b, span], mask[b, span] = torch.tensor(s), 1
            codes[b, span][1:] = self._transition_codes(torch.tensor(s), f, self.sequels)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        x = inputs[ids, :-1] + (self.transition(codes) if self.transition is not None else 0)
        hidden = self.llama(inputs_embeds=x, attention_mask=mask, position_ids=positions).last_hidden_state
        return torch.cat([hidden, torch.ones_like(hidden[..., :1])], -1)  # times an output row: logit + bias

    @staticmethod
    def _transition_codes(s: torch.Tensor, f: dict, sequels: bool = True) -> torch.Tensor:
        """1 + 2 * (same category as the previous item) + (the previous item's next part; 0 unless
        ``sequels``), for items 1..n-1."""
        same = f["category"][s[1:]] == f["category"][s[:-1]]
        sequel = (f["series_key"][s[1:]] == f["series_key"][s[:-1]]) & (
            f["part"][s[1:]] == f["part"][s[:-1]] + 1
        )
        return 1 + 2 * same.long() + (sequel.long() if sequels else 0)

    def candidate_scores(
        self, histories: list[list[int]], candidates: list[list[int]], f: dict
    ) -> torch.Tensor:
        inputs, outputs = self.tables(f)
        last = self.states([h[-40:] for h in histories], f, inputs, left_pad=True)[:, -1]
        return torch.einsum("nd,nkd->nk", last, outputs[torch.tensor(candidates)])


def _fit_content_lm(corpus: list, steps: int, model: ContentItemLM, batch: int, seed: int) -> ContentItemLM:
    """Next-item cross-entropy over each world's catalogue (items already in the sequence masked),
    every batch from one world drawn uniformly; sequences of at most 40 items."""
    rng = np.random.default_rng(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    for step in range(steps):
        sequences, features = corpus[rng.integers(len(corpus))]
        picked = [sequences[n][:40] for n in rng.integers(0, len(sequences), batch)]
        picked = [s for s in picked if len(s) >= 2]
        inputs, outputs = model.tables(features)
        logits = model.states(picked, features, inputs)[:, :-1] @ outputs.T
        width = logits.shape[1]
        seen = torch.zeros(logits.shape, dtype=torch.bool)
        targets = torch.full((len(picked), width), -100)
        for b, s in enumerate(picked):
            for t in range(len(s) - 1):
                seen[b, t:, s[t]] = True
            targets[b, : len(s) - 1] = torch.tensor(s[1:])
        loss = torch.nn.functional.cross_entropy(
            logits.masked_fill(seen, -1e4).flatten(0, 1), targets.flatten(), ignore_index=-100
        )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 500 == 0:
            print(f"step {step}: loss {loss.item():.3f}", flush=True)
    return model.eval()


CONTENT_FEATURES = (
    "same category",
    "category share",
    "cosine",
    "next part",
    "transition",
    "next part x sequel rate",
    "same category x stay rate",
)


def linear_training_data(
    repo: Path, catalog: dict, serving, sequel_of: dict[int, int], max_examples: int = 10_000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (:func:`_prompt_features`, every column) and targets of the cross-fitted examples
    ``rcllm train`` uses (up to ``max_examples`` per fold; ``rcllm train`` takes 20,000 in all).
    Cosines use the serving retriever's embeddings, as the ranker's item tokens do (test items are not
    in them); transitions come from the retriever that proposed the example's candidates (fitted on
    the other users: a transition counted from the example itself would leak its answer)."""
    from rcllm_sdk.ingest import read_manifest
    from rcllm_sdk.pipelines.examples import build_examples
    from rcllm_sdk.pipelines.run import cross_fitted_groups

    rows, targets = [], []
    for sequences, retriever in cross_fitted_groups(repo, read_manifest(repo)):
        examples, _ = build_examples([(sequences, retriever)], K, max_examples=max_examples, seed=0)
        rows += [
            _prompt_features(e.history, e.candidates, catalog, serving, retriever, sequel_of)
            for e in examples
        ]
        targets += [e.target for e in examples]
    return torch.tensor(np.stack(rows), dtype=torch.float32), torch.tensor(targets)


def fit_linear_ranker(
    x: torch.Tensor, y: torch.Tensor, features: tuple[str, ...], steps: int = 300
) -> tuple[list[int], np.ndarray]:
    """A linear softmax ranker over the candidate's position and the named ``features`` (columns of
    :func:`linear_training_data`); returns ``(columns, weights)``: score = features[:, columns] @ weights.
    It says whether the training data can teach content beyond the retriever, whatever the model."""
    columns = list(range(K)) + [K + CONTENT_FEATURES.index(f) for f in features]
    w = _fit_softmax_weights(x[:, :, columns], y, steps)
    print(
        f"learned linear ranker over position + {', '.join(features) or 'nothing'}: {len(y)} examples, "
        f"content weights {', '.join(f'{v:+.2f}' for v in w[K:])}"
    )
    return columns, w


def _fit_softmax_weights(x: torch.Tensor, y: torch.Tensor, steps: int) -> np.ndarray:
    """Weights ``w`` of a softmax over candidates with logits ``x @ w`` (``x``: [N, K, F]), fitted by Adam."""
    weights = torch.zeros(x.shape[2], requires_grad=True)
    optimiser = torch.optim.Adam([weights], lr=0.05)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(x @ weights, y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return weights.detach().numpy()


def _prompt_features(
    hist: list[int],
    cands: list[int],
    catalog: dict,
    retriever,
    transitions=None,
    sequel_of: dict[int, int] | None = None,
) -> np.ndarray:
    """``[len(cands), K + 7]``: candidate position (one-hot: the retriever's order), then
    :data:`CONTENT_FEATURES`: same category as the last item, share of the last 10 items in the
    candidate's category, cosine of the co-occurrence vectors item tokens start from, "next part of
    the last item's series" (read off the titles), the share of the last item's transitions in
    ``transitions`` (a retriever; 0 without one) that go to the candidate, over the largest such share
    among the candidates (unscaled, a linear ranker fitted it less well: +5.7% instead of +11.6%), and
    the two habit interactions: "next part" times the history's sequel rate (the share of open sequels
    the user took, with one pseudo-count each way) and "same category" times its stay rate (the share
    of other steps that stayed in the category, likewise). ``sequel_of``: :func:`_sequels` of the
    catalogue (computed when not given; pass it when calling many times)."""
    sequel_of = _sequels(catalog) if sequel_of is None else sequel_of
    emb = retriever.embeddings / np.maximum(np.linalg.norm(retriever.embeddings, axis=1, keepdims=True), 1e-9)
    last, recent = hist[-1], [catalog[i].category for i in hist[-10:]]
    sequel_rate, stay_rate = _habit_rates(hist, catalog, sequel_of)
    out = np.zeros((len(cands), K + len(CONTENT_FEATURES)))
    for n, c in enumerate(cands):
        out[n, n] = 1.0
        same_category = catalog[c].category == catalog[last].category
        share = recent.count(catalog[c].category) / len(recent)
        cosine = emb[retriever.index[c]] @ emb[retriever.index[last]]
        moved = transitions.transitions[transitions.index[last], transitions.index[c]] if transitions else 0.0
        next_part = sequel_of.get(last) == c
        out[n, K:] = (
            same_category,
            share,
            cosine,
            next_part,
            moved,
            next_part * sequel_rate,
            same_category * stay_rate,
        )
    moved_column = K + CONTENT_FEATURES.index("transition")
    out[:, moved_column] /= max(out[:, moved_column].max(), 1e-12)
    return out


def _sequels(catalog: dict) -> dict[int, int]:
    """item -> the item titled as its series' next part ("<Series> Part N")."""
    parts = {}
    for item, info in catalog.items():
        name, _, part = info.title.rpartition(" Part ")
        if part.isdigit():
            parts[(name, int(part))] = item
    return {
        item: parts[(name, part + 1)] for (name, part), item in parts.items() if (name, part + 1) in parts
    }


def _habit_rates(hist: list[int], catalog: dict, sequel_of: dict[int, int]) -> tuple[float, float]:
    took, open_sequels, stayed, other_steps = 1.0, 2.0, 1.0, 2.0  # one pseudo-count each way
    for n in range(1, len(hist)):
        a, b = hist[n - 1], hist[n]
        sequel = sequel_of.get(a)
        if sequel is not None and sequel not in hist[:n]:
            open_sequels += 1
            took += b == sequel
            if b == sequel:
                continue
        other_steps += 1
        stayed += catalog[a].category == catalog[b].category
    return took / open_sequels, stayed / other_steps


def _next_item_probability(hist, cands, cat, sequel, popularity, pref, p_seq, p_stay) -> np.ndarray:
    """P(next = each candidate | history) under the generator's mechanism (synthetic.py)."""
    seen, last = set(hist), hist[-1]
    has_sequel = sequel[last] >= 0 and sequel[last] not in seen
    p_seq = p_seq if has_sequel else 0.0
    unseen = np.ones(len(cat), bool)
    unseen[list(seen)] = False
    mass = np.bincount(cat[unseen], weights=popularity[unseen], minlength=len(pref))  # per category
    pick = popularity[cands] / np.maximum(mass[cat[cands]], 1e-12)
    other = (p_stay * (cat[cands] == cat[last]) + (1 - p_stay) * pref[cat[cands]]) * pick
    return (1 - p_seq) * other + p_seq * (cands == sequel[last])


def _estimated_habits(hist, cat, sequel, cfg) -> tuple[np.ndarray, float, float]:
    """Posterior-mean habits from the history alone (the priors of synthetic.generate)."""
    seq_values, stay_values = np.array(cfg.sequel_habits), np.array(cfg.stay_habits)
    log_seq, log_stay, n_categories = np.zeros(len(seq_values)), np.zeros(len(stay_values)), cfg.n_categories
    for n in range(1, len(hist)):
        a, b = hist[n - 1], hist[n]
        open_sequel = sequel[a] >= 0 and sequel[a] not in hist[:n]
        if open_sequel:
            with np.errstate(divide="ignore"):  # a habit value of 0 or 1 rules a habit out: log 0
                log_seq += np.log(seq_values if b == sequel[a] else 1 - seq_values)
        if not (open_sequel and b == sequel[a]):
            same = cat[a] == cat[b]
            log_stay += np.log(
                stay_values + (1 - stay_values) / n_categories
                if same
                else (1 - stay_values) * (n_categories - 1) / n_categories
            )
    post = lambda logs, values: float(values @ (np.exp(logs - logs.max()) / np.exp(logs - logs.max()).sum()))  # noqa: E731
    pref = np.bincount(cat[hist], minlength=n_categories) + 0.25
    return pref / pref.sum(), post(log_seq, seq_values), post(log_stay, stay_values)


# ---------------------------------------------------------------- sweep (GPU, torch + transformers)


def build_model(
    data: dict,
    size: str,
    seed: int = 0,
    theta: float = 10000.0,
    mimetic: float = 0.0,
    item_scale: float = 1.0,
    label_head: float = 0.0,
    head_copy: float = 0.5,
):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter = SIZES[size]
    meta = data["meta"]
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=meta["vocab"],
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
        bos_token_id=meta["bos"],
        eos_token_id=meta["eos"],
        pad_token_id=meta["pad"],
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
    )
    model = LlamaForCausalLM(config)
    emb = model.get_input_embeddings().weight
    vectors = item_scale * data["item_vectors"].float()  # [n_items, dim]
    gen = torch.Generator().manual_seed(seed)
    projection = torch.linalg.qr(torch.randn(emb.shape[1], vectors.shape[1], generator=gen))[
        0
    ]  # [hidden, dim]
    scale = emb.detach().std() * (emb.shape[1] ** 0.5)
    with torch.no_grad():  # the same init as rcllm_sdk.model.ranker._init_item_embeddings
        emb[data["item_tokens"]] = 0.5 * emb[data["item_tokens"]] + scale * (vectors @ projection.T)
    if mimetic:
        mimetic_init(model, mimetic, seed)
    if label_head:  # from an item token back to its label: the label block is [label, newline]
        label_head_init(
            model, offset=len(data["label_blocks"][0]), margin=label_head, copy_gain=head_copy, seed=seed
        )
    return model


def prompt_ids(
    data: dict,
    user: list[int],
    cands: list[int],
    hint_item: int | None,
    spans: list | None = None,
    tail_item: int | None = None,
) -> list[int]:
    """Token ids of one prompt; appends each item block's ``(start, end)`` to ``spans`` when given.
    ``tail_item`` (``recall_last``) ends the prompt with that item's token, after the query."""
    ids = data["system"] + user
    for k, c in enumerate(cands):
        ids.extend(data["label_blocks"][k])
        if spans is not None:
            spans.append((len(ids), len(ids) + len(data["item_lines"][c])))
        ids.extend(data["item_lines"][c])
    if tail_item is not None:
        return ids + data["query"] + [data["item_tokens"][tail_item]]
    if hint_item is None:
        return ids + data["query"]
    return ids + data["hint_prefix"] + [data["item_tokens"][hint_item]] + data["hint_suffix"]


def last_item(data: dict, user: list[int]) -> int:
    """Dense index of the last item named in a user block's token ids."""
    if "_item_of_token" not in data:
        data["_item_of_token"] = {t: n for n, t in enumerate(data["item_tokens"])}
    return next(data["_item_of_token"][t] for t in reversed(user) if t in data["_item_of_token"])


def query_item(data: dict, user: list[int], recall_last: bool) -> int | None:
    """The item that ends a prompt: with ``recall_last`` the user's last item (the ranking is read at
    its token, as the lookup task reads a candidate's label at a query item token), else none."""
    return last_item(data, user) if recall_last else None


def pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in seqs])
    ids = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s)
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    return ids.to(device), mask.to(device), lengths.to(device)


def label_scores(
    model, data, ids, mask, lengths, k: int, with_hidden: bool = False, bind_layer: int = 0, position_ids=None
):
    """Label logits at the last position; with ``with_hidden`` also the final hidden states, the label
    head rows and the (normed) states after layer ``bind_layer`` (0: the final ones) for the binding loss."""
    out = model.model(
        input_ids=ids, attention_mask=mask, position_ids=position_ids, output_hidden_states=bind_layer > 0
    )
    hidden = out.last_hidden_state  # [B, T, H]
    last = hidden[torch.arange(len(lengths), device=ids.device), lengths - 1]  # [B, H]
    head = model.get_output_embeddings().weight[data["label_ids"][:k]]  # [k, H]
    scores = last.float() @ head.float().T  # [B, k]
    if not with_hidden:
        return scores
    bound = model.model.norm(out.hidden_states[bind_layer]) if bind_layer else hidden
    return scores, hidden, head, bound


def binding_losses(hidden, head, spans: list[list[tuple[int, int]]], targets: list[int], bound=None):
    """(binding, candidate) losses; binding is read from ``bound`` (the states after an early layer)
    when given. Candidate: the last token of each item block scores its own label; softmax over
    candidates."""
    device = hidden.device
    binding = binding_loss(hidden if bound is None else bound, head, spans)
    ends = torch.tensor([[e - 1 for s, e in sp] for sp in spans], device=device)  # [B, k]
    last = hidden[torch.arange(len(spans), device=device)[:, None], ends].float()  # [B, k, H]
    own = (last * head.float()[None]).sum(-1)  # [B, k]: own-label logit of each candidate
    candidate = torch.nn.functional.cross_entropy(own, torch.tensor(targets, device=device))
    return binding, candidate


def binding_loss(states, head, spans: list[list[tuple[int, int]]]):
    """Every token of candidate j's item block predicts label j (softmax over the K labels)."""
    rows = [b for b, sp in enumerate(spans) for s, e in sp for _ in range(s, e)]
    cols = [p for sp in spans for s, e in sp for p in range(s, e)]
    labels = [j for sp in spans for j, (s, e) in enumerate(sp) for _ in range(s, e)]
    logits = states[rows, cols].float() @ head.float().T  # [N, k]
    return torch.nn.functional.cross_entropy(logits, torch.tensor(labels, device=states.device))


def lookup_batch(data, rng, n: int, k: int, pairs: int):
    """The dense lookup task: a prompt with ``k`` shuffled candidates and no query, followed by
    ``pairs`` item tokens naming random candidates; each must predict that candidate's label.
    The item tokens are queries isolated from one another (:func:`isolated_queries`): none sees
    another, so an earlier query cannot give a later one its answer. Returns sequences, the query
    positions, their targets, the candidates' item-block spans."""
    seqs, positions, targets, spans = [], [], [], []
    for row in rng.integers(0, len(data["train"]), n):
        user, cands, _ = data["train"][row]
        keep = rng.permutation(K)[:k]
        spans.append([])
        ids = prompt_ids(data, user, [cands[j] for j in keep], None, spans[-1])[: -len(data["query"])]
        picks = rng.integers(0, k, pairs)
        positions.append(list(range(len(ids), len(ids) + pairs)))
        targets += [int(j) for j in picks]
        seqs.append(ids + [data["item_tokens"][cands[keep[j]]] for j in picks])
    return seqs, positions, targets, spans


def isolated_queries(
    lengths: torch.Tensor, starts: list[int], width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``[B, 1, width, width]`` bool attention mask, ``[B, width]`` position ids) for sequences whose
    tokens from ``starts[b]`` on are independent queries: each attends to the prompt before it and to
    itself, at the position right after the prompt, as a query block would. Padding rows attend to
    themselves only (finite, never read)."""
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = causal.repeat(len(starts), 1, 1, 1)
    positions = torch.arange(width).repeat(len(starts), 1)
    for b, (start, length) in enumerate(zip(starts, lengths.tolist(), strict=False)):
        mask[b, 0, start:, start:] = torch.eye(width - start, dtype=torch.bool)
        mask[b, 0, length:] = torch.eye(width, dtype=torch.bool)[length:]
        positions[b, start:] = start
    return mask, positions


def lookup_losses(model, data, batch, k: int, bind_layer: int, device):
    """(lookup CE, binding CE) of a :func:`lookup_batch`."""
    seqs, positions, targets, spans = batch
    ids, _, lengths = pad(seqs, data["meta"]["pad"], device)
    mask, position_ids = isolated_queries(lengths.cpu(), [pos[0] for pos in positions], ids.shape[1])
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        _, hidden, head, bound = label_scores(
            model, data, ids, mask.to(device), lengths, k, True, bind_layer, position_ids.to(device)
        )
    rows = [b for b, pos in enumerate(positions) for _ in pos]
    cols = [c for pos in positions for c in pos]
    logits = hidden[rows, cols].float() @ head.float().T
    lookup = torch.nn.functional.cross_entropy(logits, torch.tensor(targets, device=device))
    binding = binding_loss(bound, head, spans)
    return lookup, binding


def schedules(cfg: dict, progress: float) -> tuple[float, int, bool]:
    """(hint probability, K, shuffled) at this fraction of training."""
    if cfg["hint_end"] <= 0 or progress >= cfg["hint_end"]:
        p_hint = 0.0
    elif progress < cfg["hint_hold"]:
        p_hint = 1.0
    else:
        p_hint = 1.0 - (progress - cfg["hint_hold"]) / (cfg["hint_end"] - cfg["hint_hold"])
    k = K  # the K schedule runs from the end of lookup pretraining (0 without it) to k_end
    start = cfg["pretrain"]
    if cfg["k_end"] > start and progress < cfg["k_end"]:
        k = int(
            round(cfg["k_start"] + (K - cfg["k_start"]) * max(0.0, progress - start) / (cfg["k_end"] - start))
        )
    order = cfg["order"]
    shuffled = order == "shuffle" or (order == "retriever_after_hint" and p_hint > 0)
    return p_hint, min(k, K), shuffled


def sample_batch(data, rng, cfg, progress):
    p_hint, k, shuffled = schedules(cfg, progress)
    seqs, targets, hinted, spans = [], [], [], []
    for n in rng.integers(0, len(data["train"]), cfg["batch"]):
        user, cands, target = data["train"][n]
        keep = np.sort(
            np.concatenate([[target], rng.choice([i for i in range(K) if i != target], k - 1, replace=False)])
        )
        if shuffled:
            keep = rng.permutation(keep)
        hint = rng.random() < p_hint
        spans.append([])
        tail = query_item(data, user, cfg["recall_last"])
        hint_item = cands[target] if hint else None
        seqs.append(prompt_ids(data, user, [cands[i] for i in keep], hint_item, spans[-1], tail))
        targets.append(int(np.flatnonzero(keep == target)[0]))
        hinted.append(hint)
    return seqs, targets, hinted, k, spans


def ndcg10(ranks: np.ndarray) -> np.ndarray:
    return np.where((ranks >= 0) & (ranks < 10), 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0)


def _ranks(scores: torch.Tensor, truth: list[int]) -> list[int]:
    order = torch.argsort(scores, dim=1, descending=True, stable=True).cpu().numpy()
    return [int(np.flatnonzero(o == t)[0]) if t >= 0 else -1 for o, t in zip(order, truth, strict=False)]


def _versus_retriever(ranks: np.ndarray, retr: np.ndarray) -> dict:
    diff = ndcg10(ranks) - ndcg10(retr)
    boot = np.random.default_rng(0).integers(0, len(diff), (1000, len(diff)))
    means = diff[boot].mean(axis=1)
    ranker, base = ndcg10(ranks).mean(), ndcg10(retr).mean()
    return {
        "ndcg10": float(ranker),
        "retriever_ndcg10": float(base),
        "diff": float(diff.mean()),
        "diff_ci": [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))],
        "relative": float(ranker / base - 1),
        "same_order_as_retriever": float(np.mean(ranks == retr)),
    }


@torch.no_grad()
def evaluate(model, data, rows, device, batch: int = 256, recall_last: bool = False) -> dict:
    """Rank of the truth under the ranker (last-position label logits, as served) and under retriever
    order: NDCG@10 and the paired bootstrap interval of the difference. ``per_candidate`` ranks by
    each item block's own-label logit at its last token (what the candidate loss trains)."""
    model.eval()
    ranks, cand_ranks, ce = [], [], []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        spans = [[] for _ in chunk]
        seqs = [
            prompt_ids(data, u, c, None, sp, query_item(data, u, recall_last))
            for (u, c, _), sp in zip(chunk, spans, strict=False)
        ]
        ids, mask, lengths = pad(seqs, data["meta"]["pad"], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            scores, hidden, head, _ = label_scores(model, data, ids, mask, lengths, K, with_hidden=True)
        ends = torch.tensor([[e - 1 for _, e in sp] for sp in spans], device=device)  # [B, K]
        own = (
            hidden[torch.arange(len(chunk), device=device)[:, None], ends].float() * head.float()[None]
        ).sum(-1)
        truth = [t for _, _, t in chunk]
        ranks += _ranks(scores, truth)
        cand_ranks += _ranks(own, truth)
        hits = [b for b, t in enumerate(truth) if t >= 0]
        ce += torch.nn.functional.cross_entropy(
            scores[hits].float().cpu(), torch.tensor([truth[b] for b in hits]), reduction="none"
        ).tolist()
    model.train()
    retr = np.array([t for _, _, t in rows])
    return {
        **_versus_retriever(np.array(ranks), retr),
        "label_ce": float(np.mean(ce)),
        "per_candidate": _versus_retriever(np.array(cand_ranks), retr),
    }


def train_step(
    model, opt, data: dict, cfg: dict, rng, progress: float, step: int, device, state: dict
) -> dict:
    """One optimiser step; returns the losses it saw (label CE split by hint, auxiliary CEs)."""
    warm = min(1.0, (step + 1) / cfg["warmup"])
    for group in opt.param_groups:  # warmup, then cosine to 10% over the budget
        group["lr"] = cfg["lr"] * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    if progress < cfg["pretrain"]:
        return _pretrain_step(model, opt, data, cfg, rng, device, state)
    seqs, targets, hinted, k, spans = sample_batch(data, rng, cfg, progress)
    ids, mask, lengths = pad(seqs, data["meta"]["pad"], device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        scores, hidden, head, bound = label_scores(
            model, data, ids, mask, lengths, k, True, cfg["bind_layer"]
        )
    losses = torch.nn.functional.cross_entropy(scores, torch.tensor(targets, device=device), reduction="none")
    total, seen = losses.mean(), {"k": k}
    if cfg["bind"] or cfg["cand"]:
        binding, candidate = binding_losses(hidden, head, spans, targets, bound)
        total = total + cfg["bind"] * binding + cfg["cand"] * candidate
        seen["aux"] = (binding, candidate)
    if cfg["lookup"]:
        batch = lookup_batch(data, rng, max(1, cfg["batch"] // 2), K, cfg["lookup_pairs"])
        lookup, binding = lookup_losses(model, data, batch, K, cfg["bind_layer"], device)
        total = total + cfg["lookup"] * (lookup + cfg["bind"] * binding)
        seen["lookup"], seen["lookup_k"] = lookup.detach(), K
    opt.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    seen["losses"], seen["hinted"] = losses.detach(), torch.tensor(hinted, device=device)
    return seen


def _pretrain_step(model, opt, data, cfg, rng, device, state: dict) -> dict:
    """Lookup-only step; K doubles (2, 4, ..., 20) once the lookup CE of the last 25 steps is under
    a quarter of ln K."""
    k = state.setdefault("k", 2)
    batch = lookup_batch(data, rng, cfg["batch"], k, cfg["lookup_pairs"])
    lookup, binding = lookup_losses(model, data, batch, k, cfg["bind_layer"], device)
    opt.zero_grad(set_to_none=True)
    (lookup + cfg["bind"] * binding).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    recent = state.setdefault("recent", [])
    recent.append(lookup.detach())
    if len(recent) == 25:
        if k < K and float(torch.stack(recent).mean()) < 0.25 * math.log(k):
            state["k"] = min(K, 2 * k)
        recent.clear()
    empty = torch.zeros(0, device=device)
    return {"k": k, "lookup": lookup.detach(), "lookup_k": k, "losses": empty, "hinted": empty.bool()}


def train_one(name: str, cfg: dict, data: dict, budget: float, log) -> dict:
    """Train one configuration for ``budget`` seconds (or ``cfg['steps']``), then evaluate it."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng(cfg["seed"])
    model = build_model(
        data,
        cfg["size"],
        cfg["seed"],
        theta=cfg["theta"],
        mimetic=cfg["mimetic"],
        item_scale=cfg["item_scale"],
        label_head=cfg["label_head"],
        head_copy=cfg["head_copy"],
    ).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01, fused=device.type == "cuda")
    started, step, progress = time.perf_counter(), 0, 0.0
    plain, hinted_ce, aux, lookup, lookup_k, state = [], [], [], [], None, {}
    checkpoints, next_check = {}, 0.5
    while progress < 1.0:
        seen = train_step(model, opt, data, cfg, rng, progress, step, device, state)
        step += 1
        if step % 50 == 0:  # sample the losses (each read is a device sync)
            lv, h = seen["losses"], seen["hinted"]
            plain.append(float(lv[~h].mean()) if (~h).any() and seen["k"] == K else float("nan"))
            hinted_ce.append(float(lv[h].mean()) if h.any() else float("nan"))
            aux += [tuple(x.item() for x in seen["aux"])] if "aux" in seen else []
            if "lookup" in seen:  # averaged over steps with the current K only
                lookup = (lookup if seen["lookup_k"] == lookup_k else []) + [seen["lookup"].item()]
                lookup_k = seen["lookup_k"]
        if step % 500 == 0:
            p_hint, _, shuffled = schedules(cfg, progress)
            log(
                f"{name} step {step} progress {progress:.2f} K {seen['k']} p_hint {p_hint:.2f} "
                f"shuffled {shuffled} "
                f"CE(no hint, K=20) {np.nanmean(plain[-10:]):.3f} CE(hint) {np.nanmean(hinted_ce[-10:]):.3f} "
                f"binding/candidate CE {np.mean(aux[-10:], axis=0) if aux else '-'} "
                f"lookup CE (K={lookup_k}) {np.mean(lookup[-10:]) if lookup else '-'}"
            )
        elapsed = time.perf_counter() - started
        progress = min(1.0, step / cfg["steps"]) if cfg["steps"] else elapsed / budget
        if next_check <= progress < 1.0:
            val = evaluate(model, data, data["val"], device, recall_last=cfg["recall_last"])
            checkpoints[f"{next_check:.2f}"] = {"step": step, "val": val}
            log(f"{name} checkpoint {next_check:.2f} step {step} val {json.dumps(val)}")
            next_check += 0.25
    seconds = time.perf_counter() - started
    result = {
        "name": name,
        "config": cfg,
        "steps": step,
        "train_seconds": seconds,
        "steps_per_second": step / seconds,
        "checkpoints": checkpoints,
        "val": evaluate(model, data, data["val"], device, recall_last=cfg["recall_last"]),
        "test": evaluate(model, data, data["test"], device, recall_last=cfg["recall_last"]),
    }
    log(f"{name} done steps {step} in {seconds:.0f}s test {json.dumps(result['test'])}")
    return result


def worker(args) -> None:
    import warnings

    warnings.filterwarnings("ignore", "Mean of empty slice")
    data = torch.load(args.data, weights_only=False)
    cfg = {**DEFAULTS, **json.loads(args.config)}
    if args.eval_users:  # smoke tests: evaluate on the first users only
        data["val"], data["test"] = data["val"][: args.eval_users], data["test"][: args.eval_users]
    log_file = open(args.log, "a", buffering=1)

    def log(line: str) -> None:
        log_file.write(f"[{time.strftime('%H:%M:%S')}] {line}\n")

    try:
        result = train_one(args.name, cfg, data, args.budget, log)
    except Exception as exc:  # report, so the launcher's table shows it
        log(f"{args.name} FAILED {exc!r}")
        raise
    Path(args.result).write_text(json.dumps(result, indent=2))


def sweep(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else ROUNDS[args.round]
    procs = {}
    for name in names:
        cmd = [
            sys.executable,
            __file__,
            "worker",
            "--name",
            name,
            "--config",
            json.dumps(CONFIGS[name]),
            "--data",
            args.data,
            "--budget",
            str(args.budget),
            "--log",
            str(out / "train.log"),
            "--result",
            str(tmp / f"{name}.json"),
            "--eval-users",
            str(args.eval_users),
        ]
        procs[name] = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    results = {}
    while procs:
        time.sleep(5)
        for name, proc in list(procs.items()):
            if proc.poll() is not None:
                del procs[name]
                f = tmp / f"{name}.json"
                results[name] = (
                    json.loads(f.read_text()) if f.exists() else {"name": name, "failed": proc.returncode}
                )
                (out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results))


def table(results: dict) -> str:
    rows = [
        "| config | steps | test NDCG@10 | retriever | diff [95% CI] | relative | val diff "
        "| label CE (test hits) "
        "| per-candidate NDCG@10 (diff) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if "test" not in r:
            rows.append(f"| {name} | failed | | | | | | | |")
            continue
        t, v = r["test"], r["val"]
        rows.append(
            f"| {name} | {r['steps']} | {t['ndcg10']:.4f} | {t['retriever_ndcg10']:.4f} | {t['diff']:+.4f} "
            f"[{t['diff_ci'][0]:+.4f}, {t['diff_ci'][1]:+.4f}] | {t['relative']:+.1%} | {v['diff']:+.4f} | "
            f"{t['label_ce']:.3f} | {t['per_candidate']['ndcg10']:.4f} ({t['per_candidate']['diff']:+.4f}) |"
        )
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export")
    p.add_argument("--repo", default="/tmp/gate_repo")
    p.add_argument("--out", default="bench_out/gate/data.pt")
    p = sub.add_parser("headroom")
    p.add_argument("--repo", default="/tmp/gate_repo")
    p.add_argument(
        "--sequel-habits",
        type=lambda text: tuple(float(v) for v in text.split(",")),
        help="the value the repo was ingested with (default: the generator's)",
    )
    p.add_argument(
        "--ablate", action="store_true", help="also fit linear rankers over one content feature each"
    )
    p = sub.add_parser("itemlm")
    p.add_argument("--repo", default="/tmp/gate_repo")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--window", type=int, default=40, help="training window (items per sequence)")
    p.add_argument("--scored-history", type=int, help="history items read when scoring (default: --window)")
    p = sub.add_parser("worlds")
    p.add_argument("--repo", default="/tmp/gate_repo")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument(
        "--worlds", type=int, default=8, help="other synthetic worlds trained on (seeds 1000, 1001, ...)"
    )
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="initialisation and sampling")
    p.add_argument(
        "--transitions",
        choices=["none", "category", "both"],
        default="none",
        help="give each item whether it stayed in the previous item's category (category), and whether it is "
        "its next part (both)",
    )
    p = sub.add_parser("sweep")
    p.add_argument("--data", default="bench_out/gate/data.pt")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out/gate/run"))
    p.add_argument("--tmp", default="/tmp/gate_sweep")
    p.add_argument("--budget", type=float, default=330.0, help="training seconds per configuration")
    p.add_argument("--only", help="comma-separated configuration names")
    p.add_argument(
        "--round",
        type=int,
        default=5,
        help="which round of CONFIGS to run (1: curricula, 2: binding losses, 3: lookup + mimetic init, "
        "4: + label-head init, 5: + the prompt ends with the last history item)",
    )
    p.add_argument(
        "--eval-users", type=int, default=0, help="evaluate on the first N users only (smoke test)"
    )
    p = sub.add_parser("worker")
    for flag in ("--name", "--config", "--data", "--log", "--result"):
        p.add_argument(flag, required=True)
    p.add_argument("--budget", type=float, required=True)
    p.add_argument("--eval-users", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "export":
        export(Path(args.repo), Path(args.out))
    elif args.command == "headroom":
        headroom(Path(args.repo), args.sequel_habits, args.ablate)
    elif args.command == "itemlm":
        item_lm_headroom(Path(args.repo), args.steps, args.window, scored_history=args.scored_history)
    elif args.command == "worlds":
        content_lm_headroom(
            Path(args.repo),
            args.steps,
            args.worlds,
            args.layers,
            args.hidden,
            seed=args.seed,
            transitions=args.transitions,
        )
    elif args.command == "sweep":
        sweep(args)
    else:
        worker(args)


if __name__ == "__main__":
    main()
