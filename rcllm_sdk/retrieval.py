"""First-stage candidate retrieval: item-to-item transitions blended with embedding similarity
and popularity, excluding items the user has seen. No torch: this module only plans.

Transitions are a scipy sparse matrix; where scipy is not installed (a torch + transformers
environment such as ``evaluation/gpu_check.sh``'s), :meth:`Retriever.fit` keeps them dense, which
suits small catalogs only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import scipy.sparse as sp


@dataclass(slots=True, frozen=True)
class RetrieverConfig:
    """Blend weights of the retriever's three signals; one configuration everywhere.

    ``decay`` and ``w_similarity`` were chosen on validation users of the synthetic default,
    MovieLens-100K and MovieLens-1M together (``python -m research.retriever_grid``); until
    2026-11-29 they were 0.6 and 0.3.
    """

    recent: int = 5  # how many of the last history items drive the transition score
    decay: float = 0.3  # weight of the k-th most recent item is decay**k
    w_transition: float = 1.0
    w_similarity: float = 0.05
    w_popularity: float = 0.05
    horizon: int = 3  # a transition i -> j counts when j follows i within this many steps


class Retriever:
    """Scores every item for a history and returns the top-K unseen ones, best first.

    Example:
        >>> r = Retriever.fit(sequences, item_ids, embeddings)
        >>> r.candidates([5, 9, 12], k=20)
    """

    def __init__(
        self,
        item_ids: np.ndarray,
        transitions: sp.csr_matrix | np.ndarray,
        log_popularity: np.ndarray,
        embeddings: np.ndarray,
        config: RetrieverConfig = RetrieverConfig(),
    ):
        self.item_ids = np.asarray(item_ids, np.int64)
        self.index = {int(i): n for n, i in enumerate(self.item_ids)}
        self.transitions, self.embeddings, self.config = transitions, embeddings, config
        self.log_popularity = log_popularity  # log1p(count), scaled to [0, 1]

    @classmethod
    def fit(
        cls,
        sequences: list[list[int]],
        item_ids,
        embeddings: np.ndarray,
        config: RetrieverConfig = RetrieverConfig(),
    ) -> Retriever:
        """Build from training histories (lists of item ids in time order)."""
        item_ids = np.asarray(item_ids, np.int64)
        index = {int(i): n for n, i in enumerate(item_ids)}
        dense = [np.array([index[i] for i in s], np.int64) for s in sequences]
        n = len(item_ids)
        rows, cols, vals = [], [], []
        for seq in dense:
            for step in range(1, config.horizon + 1):
                if len(seq) > step:
                    rows.append(seq[:-step])
                    cols.append(seq[step:])
                    vals.append(np.full(len(seq) - step, 1.0 / step))
        pairs = [
            np.concatenate(x) if x else np.zeros(0, dtype)
            for x, dtype in ((rows, int), (cols, int), (vals, float))
        ]
        transitions = _row_normalised(*pairs, n)
        counts = np.bincount(np.concatenate(dense), minlength=n) if dense else np.zeros(n)
        log_popularity = np.log1p(counts) / max(np.log1p(counts).max(), 1e-9)
        return cls(item_ids, transitions, log_popularity, embeddings, config)

    def scores(self, history: list[int]) -> np.ndarray:
        """Blend score of every item (dense index order) for ``history`` (item ids, oldest first)."""
        cfg = self.config
        known = [self.index[i] for i in history if i in self.index]
        recent = known[::-1][: cfg.recent]
        score = cfg.w_popularity * self.log_popularity
        if recent:
            weights = cfg.decay ** np.arange(len(recent))
            rows = self.transitions[recent]
            rows = rows.toarray() if hasattr(rows, "toarray") else rows
            score = score + cfg.w_transition * np.asarray(weights @ rows).ravel()
            profile = self.embeddings[recent].mean(axis=0)
            norm = np.linalg.norm(profile)
            if norm > 0:
                score = score + cfg.w_similarity * (self.embeddings @ (profile / norm))
        return score

    def candidates(self, history: list[int], k: int) -> list[int]:
        """Top-``k`` unseen item ids, best first (fewer when the catalog runs out)."""
        score = self.scores(history)
        seen = [self.index[i] for i in history if i in self.index]
        score[seen] = -np.inf
        k = min(k, int(np.isfinite(score).sum()))
        top = np.argpartition(-score, k - 1)[:k] if k else np.array([], np.int64)
        top = top[np.lexsort((top, -score[top]))]  # by score, ties by index: deterministic
        return [int(self.item_ids[i]) for i in top]

    def popular(self, k: int) -> list[int]:
        """Most popular item ids (the cold-start fallback)."""
        order = np.lexsort((np.arange(len(self.item_ids)), -self.log_popularity))[:k]
        return [int(self.item_ids[i]) for i in order]

    def save(self, path: str | Path) -> None:
        import scipy.sparse as sp

        t = sp.csr_matrix(self.transitions)
        np.savez_compressed(
            path,
            item_ids=self.item_ids,
            data=t.data,
            indices=t.indices,
            indptr=t.indptr,
            log_popularity=self.log_popularity,
            embeddings=self.embeddings,
            config=np.array([getattr(self.config, f) for f in RetrieverConfig.__dataclass_fields__]),
        )

    @classmethod
    def load(cls, path: str | Path) -> Retriever:
        import scipy.sparse as sp

        z = np.load(path)
        n = len(z["item_ids"])
        transitions = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=(n, n))
        fields = list(RetrieverConfig.__dataclass_fields__)
        values = {
            f: type(getattr(RetrieverConfig(), f))(v) for f, v in zip(fields, z["config"], strict=False)
        }
        return cls(
            z["item_ids"], transitions, z["log_popularity"], z["embeddings"], RetrieverConfig(**values)
        )


def _row_normalised(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n: int):
    """The ``n`` x ``n`` matrix of summed ``vals`` at ``(rows, cols)``, each row scaled to sum 1
    (rows without counts stay 0): scipy CSR, or a dense array where scipy is not installed."""
    try:
        import scipy.sparse as sp
    except ImportError:
        counts = np.zeros((n, n))
        np.add.at(counts, (rows, cols), vals)
        return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1e-9)
    counts = sp.coo_matrix((vals, (rows, cols)), shape=(n, n)).tocsr()
    row_sums = np.asarray(counts.sum(axis=1)).ravel()
    return (sp.diags(1.0 / np.maximum(row_sums, 1e-9)) @ counts).tocsr()
