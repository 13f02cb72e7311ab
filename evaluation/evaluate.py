"""``rcllm evaluate``: leave-one-out accuracy and TTFT of the ranker against the retriever alone.

Every test user's truth is their last interaction; Feast serves the history before it. The
retriever's top-K (default 20) are the candidates of both rankings, so the paired difference
isolates the ranker. A truth outside the candidates counts as a miss; the ``in_candidates``
entries repeat each metric over the users whose truth the retriever did find.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from rcllm_sdk.data.split import TEST
from rcllm_sdk.ingest import ingest, read_manifest
from rcllm_sdk.recommender import RcRecommender

from .metrics import paired_difference, rank_of, summarize
from .report import markdown_table


def evaluate(source: str, path: str | None, out: str | Path | None = None, *, model: str | None = None,
             repo: str | Path | None = None, train_config=None, synthetic=None, max_users: int | None = None,
             timing_samples: int = 200, candidates: int = 20, progress: bool = True, log_mlflow: bool = True,
             ingest_first: bool = True) -> dict:
    """Ingest ``source`` (unless ``ingest_first`` is False and ``repo`` is already ingested),
    train a ranker when ``model`` is None, evaluate, write ``out`` JSON.

    Example:
        >>> evaluate("movielens", "../shared/data/ml-100k", "ml100k.json")
    """
    repo = Path(repo) if repo else Path(tempfile.mkdtemp(prefix=f"rcllm-eval-{source}-"))
    if ingest_first:
        ingest(source, path, repo, synthetic=synthetic)
    training = None
    if model is None:
        model, training = _train(repo, train_config, progress)
    rec = RcRecommender.from_feature_store(repo, model=model, candidates=candidates)
    truth = _test_truth(repo, max_users)
    users = sorted(truth)
    full, retriever = _ranks(rec, users, truth, candidates, progress)
    manifest = read_manifest(repo)
    report = {"dataset": manifest["dataset"], "users": len(users),
              "results": {"retriever": _accuracy(retriever, retriever),
                          "full": {**_accuracy(full, retriever), **_timing(rec, users[:timing_samples])}}}
    report["results"]["full"]["ndcg@10_diff_vs_retriever"] = paired_difference(full, retriever)
    report["config"] = {"candidates": candidates, "model": str(model), "training": training,
                        "retriever": manifest["retriever"]}
    if out:
        Path(out).write_text(json.dumps(report, indent=2))
    if log_mlflow:
        _log(report, users, truth, full, retriever, out)
    print(markdown_table(report))
    return report


def _train(repo: Path, train_config, progress: bool) -> tuple[str, dict]:
    from rcllm_sdk.pipelines.run import train_from_repo

    result = train_from_repo(repo, config=train_config, progress=progress)
    return str(result["model_dir"]), result["summary"]


def _test_truth(repo: Path, max_users: int | None) -> dict[int, int]:
    test = pl.read_parquet(repo / "data" / "interactions.parquet").filter(pl.col("split") == TEST)
    test = test.sort("user_id").head(max_users) if max_users else test
    return dict(zip(test["user_id"].to_list(), test["item_id"].to_list()))


def _ranks(rec: RcRecommender, users: list[int], truth: dict, k: int, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rank of the truth under the ranker (``full``) and under the retriever's own order."""
    full, retr = [], []
    step = rec.config.batch_size
    for start in tqdm(range(0, len(users), step), desc="evaluate", disable=not progress, unit="batch"):
        batch = users[start : start + step]
        for user, result in zip(batch, rec.recommend_batch(batch, k=k)):
            full.append(rank_of(result.item_ids, truth[user]))
            retr.append(rank_of(result.candidates, truth[user]))
    return np.array(full), np.array(retr)


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
        ttft.append(result.ttft_ms); e2e.append(result.e2e_ms)
    out = {"timing_samples": len(users)}
    for name, values in (("ttft_ms", ttft), ("e2e_ms", e2e)):
        out[f"{name}_p50"], out[f"{name}_p95"] = float(np.percentile(values, 50)), float(np.percentile(values, 95))
        if len(values) >= 100:
            out[f"{name}_p99"] = float(np.percentile(values, 99))
    return out


def _log(report: dict, users, truth, full, retriever, out) -> None:
    from rcllm_sdk.tracking import log_run

    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "per_user.csv"
        pl.DataFrame({"user_id": users, "truth": [truth[u] for u in users],
                      "rank_full": full, "rank_retriever": retriever}).write_csv(table)
        artifacts = {"evaluation": table}
        if out:
            artifacts["report"] = Path(out)
        params = {"dataset": report["dataset"], "users": report["users"], **{k: v for k, v in report["config"].items()
                                                                            if k != "training"}}
        log_run("rcllm-evaluate", params, report["results"], artifacts)
