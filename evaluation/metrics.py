"""Ranking metrics for leave-one-out evaluation (one true item per user) and paired bootstrap
intervals. Metrics are found by name in ``METRICS``; each maps the 0-based rank of the truth
(``-1`` = not in the list) to a per-user value.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def ndcg_at(k: int) -> Callable[[np.ndarray], np.ndarray]:
    def metric(rank: np.ndarray) -> np.ndarray:
        hit = (rank >= 0) & (rank < k)
        return np.where(hit, 1.0 / np.log2(np.maximum(rank, 0) + 2.0), 0.0)

    return metric


def recall_at(k: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda rank: ((rank >= 0) & (rank < k)).astype(float)


def mrr_at(k: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda rank: np.where((rank >= 0) & (rank < k), 1.0 / (np.maximum(rank, 0) + 1.0), 0.0)


METRICS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "ndcg@5": ndcg_at(5),
    "ndcg@10": ndcg_at(10),
    "recall@5": recall_at(5),
    "recall@10": recall_at(10),
    "mrr@10": mrr_at(10),
}


def rank_of(ranked: list[int], truth: int) -> int:
    """0-based position of ``truth`` in ``ranked``, or -1."""
    try:
        return ranked.index(truth)
    except ValueError:
        return -1


def per_user(ranks: np.ndarray) -> dict[str, np.ndarray]:
    return {name: fn(np.asarray(ranks)) for name, fn in METRICS.items()}


def bootstrap_ci(
    values: np.ndarray, n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05
) -> list[float]:
    """Percentile bootstrap interval of the mean of per-user ``values`` (paired when given a difference)."""
    values = np.asarray(values, float)
    if len(values) == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_resamples, len(values)))
    means = values[idx].mean(axis=1)
    return [float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))]


def summarize(ranks: np.ndarray, n_resamples: int = 1000, seed: int = 0) -> dict[str, float | list[float]]:
    """Mean of each metric and its ``<metric>_ci`` 95% bootstrap interval."""
    out: dict[str, float | list[float]] = {}
    for name, values in per_user(ranks).items():
        out[name] = float(values.mean()) if len(values) else float("nan")
        out[f"{name}_ci"] = bootstrap_ci(values, n_resamples, seed)
    return out


def paired_difference(
    ranks_a: np.ndarray, ranks_b: np.ndarray, metric: str = "ndcg@10", n_resamples: int = 1000, seed: int = 0
) -> dict[str, float | list[float]]:
    """Mean of (a - b) per user for ``metric`` with its paired bootstrap interval."""
    diff = METRICS[metric](np.asarray(ranks_a)) - METRICS[metric](np.asarray(ranks_b))
    return {"mean": float(diff.mean()), "ci": bootstrap_ci(diff, n_resamples, seed)}
