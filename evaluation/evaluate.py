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
from rcllm_sdk.ingest import ingest, read_manifest
from rcllm_sdk.recommender import RcRecommender
from rcllm_sdk.retrieval import RetrieverConfig
from rcllm_sdk.runtime.policies import DEFAULT_POLICY, parse_policy

from .metrics import METRICS, paired_difference, rank_of, summarize
from .report import markdown_table

OTHER_POLICIES = ("none", "block_head:4", "block_head:8", "deviation:0.15:1")


def evaluate(
    source: str,
    path: str | None,
    out: str | Path | None = None,
    *,
    model: str | None = None,
    repo: str | Path | None = None,
    train_config=None,
    synthetic=None,
    max_users: int | None = None,
    timing_samples: int = 200,
    candidates: int = 20,
    progress: bool = True,
    log_mlflow: bool = True,
    ingest_first: bool = True,
    policy: str = DEFAULT_POLICY,
    other_policies: tuple[str, ...] = OTHER_POLICIES,
    store: str = "local://",
    retriever_config=None,
) -> dict:
    """Ingest ``source`` (unless ``ingest_first`` is False and ``repo`` is already ingested),
    train a ranker when ``model`` is None, evaluate every mode, write ``out`` JSON.

    Entries under ``results``: ``retriever``; ``full`` (the plain HF forward); ``prefix``;
    ``rcllm`` (``policy``); ``rcllm:<p>`` for each of ``other_policies``; and the control
    ``control:wrong_history`` (``rcllm`` with another user's history block), which must
    disagree with ``full`` visibly for the agreement figures to mean anything. ``retriever_config``
    is the blend ingestion fits (default ``RetrieverConfig()``).

    Example:
        >>> evaluate("movielens", "../shared/data/ml-100k", "ml100k.json")
    """
    repo = Path(repo) if repo else Path(tempfile.mkdtemp(prefix=f"rcllm-eval-{source}-"))
    if ingest_first:
        ingest(
            source, path, repo, synthetic=synthetic, retriever_config=retriever_config or RetrieverConfig()
        )
    training = None
    if model is None:
        model, training = _train(repo, train_config, progress)
    rec = RcRecommender.from_feature_store(repo, model=model, candidates=candidates, mode="full")
    truth = _test_truth(repo, max_users)
    users = sorted(truth)
    full = _ranks(rec, users, truth, candidates, progress)
    manifest = read_manifest(repo)
    results = {
        "retriever": _accuracy(full.retriever, full.retriever),
        "full": {**_accuracy(full.ranks, full.retriever), **_timing(rec, users[:timing_samples])},
    }
    results["full"]["ndcg@10_diff_vs_retriever"] = paired_difference(full.ranks, full.retriever)
    per_user = {"full": full.ranks, "retriever": full.retriever}
    for name, variant in _variants(rec, policy, other_policies, store):
        with variant:
            ranked = _ranks(variant, users, truth, candidates, progress, desc=name)
            results[name] = {**_agreement(ranked, full), **_timing(variant, users[:timing_samples])}
        per_user[name] = ranked.ranks
    report = {
        "dataset": manifest["dataset"],
        "users": len(users),
        "results": results,
        "config": {
            "candidates": candidates,
            "model": str(model),
            "policy": parse_policy(policy).spec,
            "store": store,
            "training": training,
            "retriever": manifest["retriever"],
        },
    }
    if out:
        Path(out).write_text(json.dumps(report, indent=2))
    if log_mlflow:
        _log(report, users, truth, per_user, out)
    print(markdown_table(report))
    return report


def _variants(rec: RcRecommender, policy: str, other_policies, store: str):
    """``(name, recommender)`` of every cached mode evaluated against ``full``."""
    yield "prefix", rec.with_config(mode="prefix", store=store)
    yield "rcllm", rec.with_config(mode="rcllm", policy=policy, store=store)
    for spec in other_policies:
        yield f"rcllm:{parse_policy(spec).spec}", rec.with_config(mode="rcllm", policy=spec, store=store)
    yield (
        "control:wrong_history",
        WrongHistoryRecommender(
            rec.features,
            rec.retriever,
            rec.ranker,
            replace(rec.config, mode="rcllm", policy=policy, store=store),
        ),
    )


class WrongHistoryRecommender(RcRecommender):
    """Control: each user's own candidates, ranked under the next user's history block."""

    def _prompts(self, histories):
        shown = histories[1:] + histories[:1]
        template = self.ranker.template
        plans = [
            (seen[-template.max_history :], self._candidates(own))
            for own, seen in zip(histories, shown, strict=False)
        ]
        return self._render(plans)


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


def _train(repo: Path, train_config, progress: bool) -> tuple[str, dict]:
    from rcllm_sdk.pipelines.run import train_from_repo

    result = train_from_repo(repo, config=train_config, progress=progress)
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


def _timing(rec: RcRecommender, users: list[int]) -> dict:
    """Per-request latency from single ``recommend`` calls (one warm-up call first)."""
    rec.recommend(users[0])
    ttft, e2e = [], []
    for user in users:
        result = rec.recommend(user)
        ttft.append(result.ttft_ms)
        e2e.append(result.e2e_ms)
    out = {"timing_samples": len(users)}
    for name, values in (("ttft_ms", ttft), ("e2e_ms", e2e)):
        out[f"{name}_p50"], out[f"{name}_p95"] = (
            float(np.percentile(values, 50)),
            float(np.percentile(values, 95)),
        )
        if len(values) >= 100:
            out[f"{name}_p99"] = float(np.percentile(values, 99))
    return out


def _log(report: dict, users, truth, per_user: dict[str, np.ndarray], out) -> None:
    from rcllm_sdk.tracking import log_run

    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "per_user.csv"
        columns = {"user_id": users, "truth": [truth[u] for u in users]}
        columns.update({f"rank_{name}": ranks for name, ranks in per_user.items()})
        pl.DataFrame(columns).write_csv(table)
        artifacts = {"evaluation": table}
        if out:
            artifacts["report"] = Path(out)
        params = {
            "dataset": report["dataset"],
            "users": report["users"],
            **{k: v for k, v in report["config"].items() if k != "training"},
        }
        log_run("rcllm-evaluate", params, report["results"], artifacts)
