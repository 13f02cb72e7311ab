"""Item embeddings from a factorisation of item co-occurrence.

Method: count pairs of items that occur within ``window`` positions of each other in the
users' (training) histories, weight them by positive pointwise mutual information (PPMI),
and keep the top ``dim`` singular directions of that matrix (``U * sqrt(S)``), L2-normalised.
Items never seen in training get a zero vector. The result is deterministic.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import svds


def cooccurrence(sequences: list[np.ndarray], n_items: int, window: int = 3) -> sp.csr_matrix:
    """Symmetric counts of item pairs within ``window`` positions; sequences hold dense indices."""
    rows, cols = [], []
    for seq in sequences:
        for offset in range(1, window + 1):
            if len(seq) > offset:
                rows.append(seq[:-offset])
                cols.append(seq[offset:])
    if not rows:
        return sp.csr_matrix((n_items, n_items))
    r, c = np.concatenate(rows), np.concatenate(cols)
    counts = sp.coo_matrix((np.ones(len(r)), (r, c)), shape=(n_items, n_items)).tocsr()
    return counts + counts.T


def ppmi(counts: sp.csr_matrix) -> sp.csr_matrix:
    total = counts.sum()
    row = np.asarray(counts.sum(axis=1)).ravel()
    coo = counts.tocoo()
    pmi = np.log(coo.data * total / (row[coo.row] * row[coo.col]))
    keep = pmi > 0
    return sp.csr_matrix((pmi[keep], (coo.row[keep], coo.col[keep])), shape=counts.shape)


def item_embeddings(sequences: list[np.ndarray], n_items: int, dim: int = 32, window: int = 3) -> np.ndarray:
    """``[n_items, dim]`` float32 embeddings (rows L2-normalised; zero for unseen items)."""
    matrix = ppmi(cooccurrence(sequences, n_items, window))
    k = min(dim, n_items - 2)
    if matrix.nnz == 0 or k < 1:
        return np.zeros((n_items, dim), np.float32)
    u, s, _ = svds(matrix, k=k, random_state=0)
    order = np.argsort(-s)
    vectors = u[:, order] * np.sqrt(s[order])
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), range(k)])  # deterministic sign
    vectors = vectors * signs
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = np.where(norms > 0, vectors / np.maximum(norms, 1e-12), 0.0)
    out = np.zeros((n_items, dim), np.float32)
    out[:, :k] = vectors
    return out
