import numpy as np
import pytest

from rcllm_sdk.evaluation.metrics import METRICS, bootstrap_ci, paired_difference, rank_of, summarize


def test_metrics_on_hand_written_ranks():
    ranks = np.array([0, 1, 4, 9, 10, -1])  # 0-based rank of the truth; -1 = not retrieved
    assert METRICS["ndcg@10"](ranks) == pytest.approx(
        [1, 1 / np.log2(3), 1 / np.log2(6), 1 / np.log2(11), 0, 0]
    )
    assert METRICS["ndcg@5"](ranks) == pytest.approx([1, 1 / np.log2(3), 1 / np.log2(6), 0, 0, 0])
    assert METRICS["recall@5"](ranks).tolist() == [1, 1, 1, 0, 0, 0]
    assert METRICS["recall@10"](ranks).tolist() == [1, 1, 1, 1, 0, 0]
    assert METRICS["mrr@10"](ranks) == pytest.approx([1, 0.5, 0.2, 0.1, 0, 0])


def test_rank_of():
    assert rank_of([5, 7, 9], 9) == 2
    assert rank_of([5, 7, 9], 4) == -1


def test_summarize_reports_interval_around_mean():
    out = summarize(np.array([0, 0, -1, -1]))
    assert out["recall@10"] == 0.5
    lo, hi = out["recall@10_ci"]
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0


def test_bootstrap_of_constant_is_that_constant():
    assert bootstrap_ci(np.full(50, 0.25)) == pytest.approx([0.25, 0.25])


def test_paired_difference_sign():
    better, worse = np.array([0, 0, 1, 2]), np.array([3, -1, 5, 2])
    diff = paired_difference(better, worse, "ndcg@10")
    assert diff["mean"] > 0 and diff["ci"][0] >= 0
