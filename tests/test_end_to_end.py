"""Generate -> ingest (Feast) -> train a micro ranker -> recommend -> evaluate, on a temp-dir repo."""

import json
from pathlib import Path

import jsonschema
import polars as pl
import pytest

from rcllm_sdk import RcRecommender
from rcllm_sdk.errors import FeatureRepoError, NotEnoughCandidatesError, UnknownUserError
from rcllm_sdk.features import FeatureClient


def test_feast_round_trip_serves_histories_without_test_items(ingested_repo):
    interactions = pl.read_parquet(ingested_repo / "data" / "interactions.parquet")
    client = FeatureClient(ingested_repo)
    users = interactions["user_id"].unique().sort().to_list()[:5]
    for user, (items, stamps) in zip(users, client.histories(users), strict=False):
        mine = interactions.filter(pl.col("user_id") == user).sort("position")
        assert items == mine.filter(pl.col("split") != "test")["item_id"].to_list()
        assert stamps == mine.filter(pl.col("split") != "test")["timestamp"].to_list()
    assert client.histories([10**9]) == [None]
    row = client.items([1])
    assert row["title"][0] and len(row["embedding"][0]) == 32


def test_recommend_ranks_retrieved_unseen_items(trained_repo):
    repo, result = trained_repo
    rec = RcRecommender.from_feature_store(repo)
    interactions = pl.read_parquet(repo / "data" / "interactions.parquet")
    user = int(interactions["user_id"][0])
    out = rec.recommend(user, k=5)
    history = rec.features.histories([user])[0][0]
    assert len(out.item_ids) == 5 and len(set(out.item_ids)) == 5
    assert out.candidates == rec.retriever.candidates(history, 20)
    assert set(out.item_ids) <= set(out.candidates)
    assert not set(out.item_ids) & set(history)
    assert out.scores == sorted(out.scores, reverse=True)
    assert out.ttft_ms > 0 and out.e2e_ms >= out.ttft_ms and out.source == "ranker"
    batch = rec.recommend_batch([user, user + 1], k=5)
    assert batch[0].item_ids == out.item_ids


def test_test_item_never_reaches_a_prompt_nor_is_excluded_as_seen(trained_repo):
    repo, _ = trained_repo
    rec = RcRecommender.from_feature_store(repo)
    test = pl.read_parquet(repo / "data" / "interactions.parquet").filter(pl.col("split") == "test")
    found = 0
    for user, truth in test.head(30).select("user_id", "item_id").iter_rows():
        history = rec.features.histories([user])[0][0]
        assert truth not in history
        found += truth in rec.retriever.candidates(history, 20)
    assert found > 0  # the truth can be a candidate: it was not filtered out as already seen


def test_model_loads_from_the_mlflow_run(trained_repo):
    repo, result = trained_repo
    rec = RcRecommender.from_feature_store(repo, model=result["model_uri"])
    assert rec.ranker.fingerprint == RcRecommender.from_feature_store(repo).ranker.fingerprint


def test_errors_and_cold_start(trained_repo, tmp_path):
    repo, _ = trained_repo
    rec = RcRecommender.from_feature_store(repo)
    with pytest.raises(UnknownUserError, match="cold_start"):
        rec.recommend(10**9)
    with pytest.raises(NotEnoughCandidatesError, match="k=21"):
        rec.recommend(1, k=21)
    cold = RcRecommender.from_feature_store(repo, cold_start="popular").recommend(10**9, k=3)
    assert cold.source == "popularity" and cold.item_ids == rec.retriever.popular(3)
    with pytest.raises(FeatureRepoError, match="rcllm ingest"):
        RcRecommender.from_feature_store(tmp_path)


def test_evaluate_writes_the_report(trained_repo, tmp_path):
    from conftest import TINY
    from rcllm_sdk.evaluation.evaluate import EvaluateConfig, evaluate

    repo, result = trained_repo
    out = tmp_path / "report.json"
    ingested = {p: p.stat().st_mtime_ns for p in (repo / "data").glob("*.parquet")}
    report = evaluate(
        EvaluateConfig(
            source=None, out=out, model=str(result["model_dir"]), repo=repo, timing_samples=5, progress=False
        )
    )
    assert {p: p.stat().st_mtime_ns for p in (repo / "data").glob("*.parquet")} == ingested  # not re-ingested
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["users"] == TINY.n_users
    full, retr = saved["results"]["full"], saved["results"]["retriever"]
    for entry in (full, retr):
        for metric in ("ndcg@5", "ndcg@10", "recall@5", "recall@10", "mrr@10"):
            lo, hi = entry[f"{metric}_ci"]
            assert lo <= entry[metric] <= hi
            assert metric in entry["in_candidates"]
    assert full["recall@10"] <= retr["in_candidates"]["users"] / saved["users"] + 1e-9
    assert full["ttft_ms_p50"] > 0 and "ttft_ms_p99" not in full  # p99 needs >= 100 samples
    timed = {m: saved["results"][m] for m in ("full", "prefix", "rcllm")}
    assert all(entry["timing_samples"] == 5 for entry in timed.values())
    # Every timed prompt is new to its engine: prefix finds the system and history prefix, not the
    # whole prompt; rcllm finds every block and computes only its policy's tokens, labels and query.
    computed = {m: entry["timing_computed_fraction"] for m, entry in timed.items()}
    assert computed["full"] == 1.0 and 0.3 < computed["prefix"] < 1.0
    assert computed["rcllm"] < computed["prefix"]
    schema = json.loads(
        (Path(__file__).parents[1] / "evaluation" / "schemas" / "evaluate.schema.json").read_text()
    )
    jsonschema.validate(saved, schema)
    results = saved["results"]
    assert {"prefix", "rcllm", "rcllm:none", "control:wrong_history"} <= set(results)
    assert results["prefix"]["top1_agreement_with_full"] == 1.0  # exact reuse: the same rankings
    assert results["prefix"]["top10_overlap_with_full"] == 1.0
    assert results["rcllm:none"]["recompute_fraction"] < results["rcllm"]["recompute_fraction"] < 1.0
    assert saved["config"]["policy"] == "block_head:2"


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    from rcllm_sdk.cli import main

    assert main(["recommend", "--repo", str(tmp_path), "--user", "1"]) == 2
    assert "rcllm ingest" in capsys.readouterr().err


def test_cli_recommend_prints_json(trained_repo, capsys):
    from rcllm_sdk.cli import main

    repo, _ = trained_repo
    assert main(["recommend", "--repo", str(repo), "--user", "1", "--k", "3"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["user_id"] == 1 and len(line["item_ids"]) == 3
