"""``RcRecommender.from_frames``: in-memory features, no Feast / polars / LMCache (nor scipy) needed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from rcllm_sdk import RcRecommender
from rcllm_sdk.errors import DataFormatError
from rcllm_sdk.features.memory import MemoryFeatures

from .tiny_checkpoints import make_checkpoint

ITEMS = {
    i: {"title": f"Film {i}", "category": ["Drama", "Comedy"][i % 2], "text": f"story {i}"}
    for i in range(1, 25)
}
USERS = {u: [(u * 5 + j * 7) % 24 + 1 for j in range(5)] for u in range(1, 9)}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2", "bpe")


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_from_frames_serves_without_feast_polars_or_lmcache(model):
    loaded = _run(
        f"""
        import sys
        from rcllm_sdk import RcRecommender
        users = {USERS!r}
        items = {ITEMS!r}
        with RcRecommender.from_frames(users, items, model={str(model)!r}, candidates=4, guard=False) as rec:
            assert rec.config.store == "memory://"
            first, again = rec.recommend(1, k=3), rec.recommend(1, k=3)
            assert again.cache.hits > 0 and again.item_ids == first.item_ids
        print(sorted(m for m in ("feast", "polars", "lmcache", "pandas", "mlflow") if m in sys.modules))
        """
    )
    assert loaded == "[]"


def test_from_frames_runs_where_only_torch_and_transformers_are_installed(model):
    """gpu_check.sh's environment: no scipy either (the retriever keeps its transitions dense)."""
    result = _run(
        f"""
        import sys
        for name in ("scipy", "pandas", "polars", "feast", "lmcache", "mlflow", "sklearn"):
            sys.modules[name] = None  # importing any of them now fails
        from rcllm_sdk import RcRecommender
        with RcRecommender.from_frames({USERS!r}, {ITEMS!r}, model={str(model)!r}, candidates=4,
                                       mode="rcllm", policy="full", guard=False) as rec:
            with rec.with_config(mode="full") as full:
                a, b = rec.recommend(2, k=4), full.recommend(2, k=4)
        print(a.item_ids == b.item_ids and max(abs(x - y) for x, y in zip(a.scores, b.scores)) < 1e-4)
        """
    )
    assert result == "True"


def test_dataframes_and_rows_give_the_same_features():
    import pandas as pd  # installed with feast; the SDK never imports it

    interactions = pd.DataFrame(
        {"user_id": [1, 2, 1, 1], "item_id": [10, 11, 12, 11], "timestamp": [30, 5, 10, 20]}
    )
    items = pd.DataFrame({"item_id": [10, 11, 12], "title": ["A", "B", "C"], "category": ["x", "y", None]})
    features = MemoryFeatures.from_data(interactions, items)
    assert features.histories([1, 2, 3]) == [([12, 11, 10], [10, 20, 30]), ([11], [5]), None]
    assert features.items([12, 99]) == {
        "title": ["C", None],
        "category": ["", None],
        "text": ["", None],
        "embedding": [None, None],
    }
    rows = [{"user_id": u, "item_id": i, "timestamp": t} for u, i, t in interactions.itertuples(index=False)]
    columns = {"item_id": [10, 11, 12], "title": ["A", "B", "C"], "category": ["x", "y", None]}
    same = MemoryFeatures.from_data(rows, columns)
    assert same.histories([1, 2]) == features.histories([1, 2]) and same.items([10]) == features.items([10])


@pytest.mark.parametrize(
    "users, items, match",
    [
        ({1: [1, 99]}, {1: {"title": "A"}}, "missing from the items"),
        ({1: "12"}, {1: {"title": "A"}}, "list of item ids"),
        ({"u1": [1]}, {1: {"title": "A"}}, "user id must be an integer"),
        ({1: [1]}, {1: "A"}, "mapping of item features"),
        ([{"user": 1, "item_id": 1}], {1: {"title": "A"}}, "missing column"),
        (42, {1: {"title": "A"}}, "DataFrame"),
    ],
)
def test_bad_frames_raise_data_format_error(users, items, match):
    with pytest.raises(DataFormatError, match=match):
        MemoryFeatures.from_data(users, items)


def test_a_loaded_ranker_a_fitted_retriever_and_a_named_store(model, monkeypatch):
    from rcllm_sdk.model.ranker import load_ranker
    from rcllm_sdk.retrieval import Retriever

    ranker = load_ranker(model)
    features = MemoryFeatures.from_data(USERS, ITEMS)
    retriever = Retriever.fit(features.sequences(), features.item_ids, features.embeddings())
    with RcRecommender.from_frames(
        USERS, ITEMS, model=ranker, retriever=retriever, candidates=4, mode="full"
    ) as rec:
        assert rec.ranker is ranker and rec.retriever is retriever
        assert rec.recommend(3, k=2).candidates == retriever.candidates(USERS[3], 4)
    monkeypatch.setenv("RCLLM_STORE", "memory://named")
    with RcRecommender.from_frames(USERS, ITEMS, model=ranker, candidates=4, guard=False) as rec:
        assert rec.config.store == "memory://named"
