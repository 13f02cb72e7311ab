"""``rcllm evaluate``: leave-one-out accuracy and TTFT of the ranker against the retriever alone.

Every test user's truth is their last interaction; Feast serves the history before it. The
retriever's top-K (default 20) are the candidates of both rankings, so the paired difference
isolates the ranker. A truth outside the candidates counts as a miss; the ``in_candidates``
entries repeat each metric over the users whose truth the retriever did find.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from rcllm_sdk.data.split import TEST
from rcllm_sdk.errors import ConfigError
from rcllm_sdk.ingest import ingest, read_manifest
from rcllm_sdk.recommender import RcRecommender
from rcllm_sdk.retrieval import RetrieverConfig
from rcllm_sdk.runtime.policies import DEFAULT_POLICY, parse_policy

from .metrics import METRICS, paired_difference, rank_of, summarize
from .report import markdown_table
from .timing import time_modes

OTHER_POLICIES = ("none", "block_head:4", "block_head:8", "deviation:0.15:1")


@dataclass(slots=True)
class EvaluateConfig:
    """What ``rcllm evaluate`` evaluates and how.

    Attributes:
        source: ``synthetic``, ``movielens`` or ``csv``; None evaluates ``repo`` as ingested.
        path: the source's folder (movielens, csv).
        out: report JSON path (None: not written).
        model: evaluate this model (HF folder or MLflow URI) instead of training one.
        repo: feature repo; ingested into when ``source`` is given (None: a temporary folder). A
            ranker trained here goes to ``<repo>/data/evaluated_ranker``, so the served
            ``<repo>/data/ranker`` is left as it was.
        train: training settings when a ranker is trained (None: ``TrainConfig.resolve()``).
        synthetic: ``SyntheticConfig`` of the synthetic source.
        retriever: the blend ingestion fits (None: ``RetrieverConfig()``).
        max_users: evaluate the first this many test users (None: all).
        timing_samples: users timed per mode (warm requests, ``evaluation.timing``).
        candidates: retriever candidates ranked per user.
        policy: the ``rcllm`` selection policy; ``other_policies`` are evaluated beside it.
        store: KV store URL of the cached modes.
        device, dtype: where and in which precision the ranker runs (``RecommenderConfig``).
        progress, log_mlflow: progress bars; an MLflow parent run with nested per-mode runs.
        mlflow_tags: extra tags of the parent run (e.g. the pipeline run that asked for it).
    """

    source: str | None = "synthetic"
    path: str | None = None
    out: str | Path | None = None
    model: str | None = None
    repo: str | Path | None = None
    train: object = None
    synthetic: object = None
    retriever: object = None
    max_users: int | None = None
    timing_samples: int = 200
    candidates: int = 20
    policy: str = DEFAULT_POLICY
    other_policies: tuple[str, ...] = OTHER_POLICIES
    store: str = "local://"
    device: str = "cpu"
    dtype: str = "auto"
    progress: bool = True
    log_mlflow: bool = True
    mlflow_tags: dict | None = None

    def __post_init__(self):
        if self.source is None and self.repo is None:
            raise ConfigError("evaluate needs a source to ingest or an ingested repo")
        if self.timing_samples < 2 or self.candidates < 2:
            raise ConfigError("timing_samples and candidates must be >= 2")
        parse_policy(self.policy)


def evaluate(config: EvaluateConfig) -> dict:
    """Ingest ``config.source`` into ``config.repo`` (when a source is given), train a ranker when
    ``config.model`` is None, evaluate every mode on the test users, write ``config.out``.

    Entries under ``results``: ``retriever``; ``full`` (the plain HF forward); ``prefix``;
    ``rcllm`` (``policy``); ``rcllm:<p>`` for each of ``other_policies``; and the control
    ``control:wrong_history`` (``rcllm`` with another user's history block), which must
    disagree with ``full`` visibly for the agreement figures to mean anything. Timings are warm
    requests on prompts new to each mode's engine (``evaluation.timing``).

    Example:
        >>> evaluate(EvaluateConfig("movielens", "../shared/data/ml-100k", "ml100k.json"))
    """
    repo = Path(config.repo) if config.repo else Path(tempfile.mkdtemp(prefix="rcllm-eval-"))
    if config.source is not None:
        ingest(
            config.source,
            config.path,
            repo,
            synthetic=config.synthetic,
            retriever_config=config.retriever or RetrieverConfig(),
        )
    model, training = config.model, None
    if model is None:
        out_dir = repo / "data" / ("evaluated_ranker" if config.repo else "ranker")  # never the served one
        model, training = _train(repo, out_dir, config.train, config.progress)
    rec = RcRecommender.from_feature_store(
        repo, model=model, candidates=config.candidates, mode="full", device=config.device, dtype=config.dtype
    )
    training = training or getattr(rec.ranker, "training", None)  # a given model's own training record
    truth = _test_truth(repo, config.max_users)
    users = sorted(truth)
    full = _ranks(rec, users, truth, config.candidates, config.progress)
    results = {
        "retriever": _accuracy(full.retriever, full.retriever),
        "full": _accuracy(full.ranks, full.retriever),
    }
    results["full"]["ndcg@10_diff_vs_retriever"] = paired_difference(full.ranks, full.retriever)
    per_user = {"full": full.ranks, "retriever": full.retriever}
    for name, variant in _variants(rec, config.policy, config.other_policies, config.store):
        with variant:
            ranked = _ranks(variant, users, truth, config.candidates, config.progress, desc=name)
        results[name] = _agreement(ranked, full)
        per_user[name] = ranked.ranks
    ttft_samples: dict[str, list[float]] = {}
    _add_timing(results, rec, users, config, ttft_samples)
    report = _report(repo, users, results, model, training, config)
    if config.out:
        Path(config.out).write_text(json.dumps(report, indent=2))
    if config.log_mlflow:
        from .mlflow_log import log_evaluation

        log_evaluation(report, per_user, users, truth, ttft_samples, repo, config.out, config.mlflow_tags)
    print(markdown_table(report))
    return report


def _add_timing(
    results: dict, rec: RcRecommender, users: list[int], config: EvaluateConfig, samples: dict
) -> None:
    """Warm TTFT of every mode on the first ``timing_samples`` test users, each mode on a fresh
    engine; every request's TTFT goes to ``samples``."""
    timed = users[: config.timing_samples + 1]
    modes = {"full": rec.with_config(mode="full")}
    modes.update(_variants(rec, config.policy, config.other_policies, config.store))
    try:
        figures = time_modes(modes, timed[1:], warmup_user=timed[0], ttft_samples=samples)
    finally:
        for variant in modes.values():
            variant.close()
    for name, values in figures.items():
        results[name].update(values)


def _report(repo: Path, users, results: dict, model, training, config: EvaluateConfig) -> dict:
    manifest = read_manifest(repo)
    return {
        "dataset": manifest["dataset"],
        "users": len(users),
        "results": results,
        "config": {
            "candidates": config.candidates,
            "model": str(model),
            "policy": parse_policy(config.policy).spec,
            "store": config.store,
            "training": training,
            "retriever": manifest["retriever"],
            "timing": {
                "samples": config.timing_samples,
                "method": "warm requests, each prompt new to its mode's engine: rcllm's store holds what "
                "refresh precomputes (system, item and the users' history blocks), prefix's the system "
                "and history token prefix; one request per user and mode, modes in rotating order",
                "rcllm_guard": "off (pure reuse)",
            },
        },
    }


def _variants(rec: RcRecommender, policy: str, other_policies, store: str):
    """``(name, recommender)`` of every cached mode evaluated against ``full``, each measured pure
    (the reuse guard's fallback to full prefill switched off)."""
    pure = {"guard": False}  # the reuse guard would send short prompts to full prefill
    yield "prefix", rec.with_config(mode="prefix", store=store, **pure)
    yield "rcllm", rec.with_config(mode="rcllm", policy=policy, store=store, **pure)
    for spec in other_policies:
        name = f"rcllm:{parse_policy(spec).spec}"
        yield name, rec.with_config(mode="rcllm", policy=spec, store=store, **pure)
    control = replace(rec.config, mode="rcllm", policy=policy, store=store, **pure)
    yield "control:wrong_history", WrongHistoryRecommender(rec.features, rec.retriever, rec.ranker, control)


class WrongHistoryRecommender(RcRecommender):
    """Control: each user's own candidates, ranked under the next user's history block."""

    def _render_plans(self, plans):
        shown = [p.history for p in plans[1:] + plans[:1]]
        keep = self.ranker.template.max_history
        return self._render([(seen[-keep:], p.candidates) for p, seen in zip(plans, shown, strict=True)])


def _agreement(ranked: Ranked, full: Ranked) -> dict:
    """Accuracy of a cached mode, its agreement with ``full`` on the same users, and its
    NDCG@10 relative to ``full`` with a paired bootstrap interval."""
    out = _accuracy(ranked.ranks, full.retriever)
    out["top1_agreement_with_full"] = float(
        np.mean([a[0] == b[0] for a, b in zip(ranked.top, full.top, strict=False)])
    )
    out["top10_overlap_with_full"] = float(
        np.mean(
            [
                len(set(a[:10]) & set(b[:10])) / min(10, len(b))
                for a, b in zip(ranked.top, full.top, strict=False)
            ]
        )
    )
    diff = paired_difference(ranked.ranks, full.ranks)
    base = float(METRICS["ndcg@10"](full.ranks).mean()) or float("nan")
    out["ndcg@10_diff_vs_full"] = diff
    out["ndcg@10_rel_diff_vs_full"] = {"mean": diff["mean"] / base, "ci": [c / base for c in diff["ci"]]}
    out["recompute_fraction"] = ranked.recompute_fraction
    return out


def _train(repo: Path, out_dir: Path, train_config, progress: bool) -> tuple[str, dict]:
    from rcllm_sdk.pipelines.run import train_from_repo

    result = train_from_repo(repo, out_dir, config=train_config, progress=progress)
    return str(result["model_dir"]), result["summary"]


def _test_truth(repo: Path, max_users: int | None) -> dict[int, int]:
    test = pl.read_parquet(repo / "data" / "interactions.parquet").filter(pl.col("split") == TEST)
    test = test.sort("user_id").head(max_users) if max_users else test
    return dict(zip(test["user_id"].to_list(), test["item_id"].to_list(), strict=False))


@dataclass(slots=True)
class Ranked:
    """Per-user outcome of one mode: rank of the truth, ranked item ids, the retriever's rank."""

    ranks: np.ndarray
    top: list[list[int]]
    retriever: np.ndarray
    recompute_fraction: float


def _ranks(
    rec: RcRecommender, users: list[int], truth: dict, k: int, progress: bool, desc: str = "full"
) -> Ranked:
    ranks, top, retr, fractions = [], [], [], []
    step = rec.config.batch_size
    for start in tqdm(
        range(0, len(users), step), desc=f"evaluate {desc}", disable=not progress, unit="batch"
    ):
        batch = users[start : start + step]
        for user, result in zip(batch, rec.recommend_batch(batch, k=k), strict=False):
            ranks.append(rank_of(result.item_ids, truth[user]))
            retr.append(rank_of(result.candidates, truth[user]))
            top.append(result.item_ids)
            fractions.append(result.cache.recomputed_fraction)
    return Ranked(np.array(ranks), top, np.array(retr), float(np.mean(fractions)))


def _accuracy(ranks: np.ndarray, retriever_ranks: np.ndarray) -> dict:
    found = retriever_ranks >= 0
    out = summarize(ranks)
    out["in_candidates"] = {**summarize(ranks[found]), "users": int(found.sum())}
    return out
