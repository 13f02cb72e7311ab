"""Challenger against champion on the same validation users: each user's validation item is the
truth, the training items before it the history, the top ``candidates`` of a retriever fitted on the
training items only (the served one has seen the validation items) the candidates both models rank
(``full`` mode, the plain forward); NDCG@10 per model and the paired difference with its bootstrap
interval."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from rcllm_sdk.data.split import TRAIN, VAL
from rcllm_sdk.evaluation.metrics import METRICS, paired_difference, rank_of


def validation_cases(repo: Path, max_users: int | None = None) -> list[tuple[int, list[int], int]]:
    """``(user, history before the validation item, validation item)`` for every validation user."""
    table = pl.read_parquet(repo / "data" / "interactions.parquet").filter(
        pl.col("split").is_in([TRAIN, VAL])
    )
    grouped = (
        table.sort(["user_id", "position"])
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("item_id"), pl.col("split"))
        .filter(pl.col("split").list.contains(VAL))
        .sort("user_id")
    )
    cases = [(u, items[:-1], items[-1]) for u, items, _ in grouped.iter_rows() if len(items) > 1]
    return cases[:max_users] if max_users else cases


def validation_retriever(repo: Path):
    """A retriever fitted on the training items only: the served one has seen the validation items."""
    from rcllm_sdk.data.split import TEST, histories
    from rcllm_sdk.ingest import fit_retriever, read_manifest
    from rcllm_sdk.retrieval import RetrieverConfig

    manifest = read_manifest(repo)
    interactions = pl.read_parquet(repo / "data" / "interactions.parquet")
    items = pl.read_parquet(repo / "data" / "items.parquet", columns=["item_id"])
    train = histories(interactions, exclude=(VAL, TEST))
    return fit_retriever(train, items, manifest["embedding"]["dim"], RetrieverConfig(**manifest["retriever"]))


def validation_ranks(repo: Path, model: str | Path, cases, retriever, candidates: int = 20) -> np.ndarray:
    """0-based rank of each case's truth in ``model``'s ranking of ``retriever``'s candidates (-1: not
    among them)."""
    from rcllm_sdk.recommender import RcRecommender

    rec = RcRecommender.from_feature_store(repo, model=model, mode="full", candidates=candidates)
    rec.retriever = retriever
    keep = rec.ranker.template.max_history
    ranks = []
    for start in range(0, len(cases), rec.config.batch_size):
        batch = cases[start : start + rec.config.batch_size]
        prompts = rec._render([(history[-keep:], rec._candidates(history)) for _, history, _ in batch])
        scored = rec._score(prompts, [rec.label_ids[: len(p.candidate_ids)] for p in prompts])
        for (_, _, truth), prompt, (score, _) in zip(batch, prompts, scored, strict=True):
            order = np.argsort(-score.numpy(), kind="stable")
            ranks.append(rank_of([prompt.candidate_ids[i] for i in order], truth))
    return np.array(ranks)


def compare(
    repo: Path, challenger: str | Path, champion: str | Path | None, max_users: int | None = None
) -> dict:
    """NDCG@10 of the challenger (and the champion, when there is one) on the validation users and,
    with a champion, the paired difference challenger - champion (``diff``: mean and 95% interval)."""
    repo = Path(repo)
    cases, retriever = validation_cases(repo, max_users), validation_retriever(repo)
    new = validation_ranks(repo, challenger, cases, retriever)
    out = {"users": len(cases), "challenger": {"ndcg@10": float(METRICS["ndcg@10"](new).mean())}}
    if champion is not None:
        old = validation_ranks(repo, champion, cases, retriever)
        out["champion"] = {"ndcg@10": float(METRICS["ndcg@10"](old).mean())}
        out["diff"] = paired_difference(new, old)
    return out


def decide(evaluation: dict, margin: float) -> tuple[bool, str]:
    """Promote the challenger? Yes without a champion, or when its NDCG@10 gain is above ``margin``."""
    if "diff" not in evaluation:
        return True, "no champion yet: the first model becomes champion"
    diff = evaluation["diff"]
    lo, hi = diff["ci"]
    figures = f"NDCG@10 challenger - champion {diff['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}]"
    if diff["mean"] > margin:
        return True, f"{figures} is above the margin {margin:+.4f}"
    return False, f"{figures} is not above the margin {margin:+.4f}: the champion stays"
