"""``rcllm bench-load``'s pure parts on hand-written outcomes: Zipf draws, a report row, the
batching comparison and the markdown (the load run itself is exercised by the HTTP tests'
server; its figures belong in the benchmark's report, not in assertions)."""

from __future__ import annotations

import numpy as np

from rcllm_sdk.evaluation.bench_load import (
    LoadConfig,
    batching_gain,
    markdown,
    prewarm_bodies,
    request_bodies,
    row,
    zipf_ranks,
)


def test_zipf_ranks_favour_the_first_ranks_and_stay_in_range():
    draws = zipf_ranks(50, 5000, 1.0, np.random.default_rng(0))
    counts = np.bincount(draws, minlength=50)
    assert draws.min() >= 0 and draws.max() < 50
    assert counts[0] > 3 * counts[9] > 0  # rank 1 ~ 10x rank 10 under s = 1


def test_every_stream_of_a_run_shares_one_popularity_order(tmp_path):
    """Regression: each draw once shuffled the catalog anew, so no item was popular."""
    import polars as pl

    (tmp_path / "data").mkdir()
    pl.DataFrame({"user_id": list(range(100))}).write_parquet(tmp_path / "data" / "user_history.parquet")
    pl.DataFrame({"item_id": list(range(1000, 1300))}).write_parquet(tmp_path / "data" / "items.parquet")
    config = LoadConfig(repo=str(tmp_path), candidates=5)

    def counts(seed):
        bodies = request_bodies(config, 400, seed)
        users = np.bincount([b["user_id"] for b in bodies], minlength=100)
        items = np.bincount([i - 1000 for b in bodies for i in b["candidates"]], minlength=300)
        return users, items

    (users_a, items_a), (users_b, items_b) = counts(1), counts(2)
    assert users_a.argmax() == users_b.argmax() and items_a.argmax() == items_b.argmax()
    assert np.sort(items_a)[::-1][:10].sum() > 0.2 * items_a.sum()  # a popular head exists
    assert all(len(set(b["candidates"])) == 5 for b in request_bodies(config, 50, 3))


def test_prewarm_reads_every_block_of_the_run_in_valid_requests():
    config = LoadConfig(candidates=4, k=3)
    bodies = [{"user_id": u, "k": 3, "candidates": [u, u + 10, u + 20, u + 30]} for u in range(1, 4)]
    warm = prewarm_bodies(config, bodies)
    assert {b["user_id"] for b in warm} == {1, 2, 3}
    assert {i for b in warm for i in b["candidates"]} == {i for b in bodies for i in b["candidates"]}
    assert all(3 <= len(set(b["candidates"])) == len(b["candidates"]) <= 4 for b in warm)
    retrieved = prewarm_bodies(LoadConfig(candidates_from="retriever"), [{"user_id": 5}, {"user_id": 5}])
    assert retrieved == [{"user_id": 5, "k": 10}]


def _ok(e2e, hits=3, misses=1, local=3, remote=0):
    cache = {"hits": hits, "misses": misses, "local_hits": local, "remote_bytes": remote}
    return 200, e2e + 1.0, {"e2e_ms": e2e, "cache": cache}


def test_a_row_from_outcomes():
    outcomes = [_ok(10.0), _ok(20.0, remote=100), (503, 1.0, {"error": {}}), (0, 5.0, {"error": {}})]
    r = row(outcomes, 2.0, (12.0, 4.0))
    assert r["throughput_rps"] == 1.0 and r["ttft_ms_p50"] == 15.0
    assert r["mean_batch_size"] == 3.0 and r["local_hit_rate"] == 6 / 8
    assert r["remote_bytes_per_request"] == 50 and (r["rejected"], r["failed"]) == (1, 1)


def _run(batching, rate, tput, p99, idle=10.0):
    return {
        "routing": "single",
        "batching": batching,
        "rate_rps": rate,
        "throughput_rps": tput,
        "ttft_ms_p50": p99 / 2,
        "ttft_ms_p95": p99,
        "ttft_ms_p99": p99,
        "e2e_ms_p99": p99,
        "mean_batch_size": 1.0,
        "local_hit_rate": 1.0,
        "rejected": 0,
        "idle_ttft_ms_p50": idle,
    }


def test_batching_gain_compares_at_batch_one_s_last_good_rate():
    runs = [
        _run("none", 10, 10, 15),
        _run("none", 20, 19, 19),  # the highest rate with p99 <= 2 x idle p50
        _run("none", 40, 25, 90),
        _run("continuous:8", 10, 10, 14),
        _run("continuous:8", 40, 38, 18),
    ]
    summary = batching_gain(runs)
    assert summary["batch1_rate_rps"] == 20 and summary["continuous_at_equal_p99_throughput_rps"] == 38
    assert summary["gain_at_equal_p99"] == 2.0
    at_40 = summary["at_each_rate"][2]  # batch 1's p99 90 ms: continuous serves 38 rps within it
    assert (at_40["rate_rps"], at_40["gain_at_equal_p99"]) == (40, 38 / 25)
    none_good = batching_gain([r for r in runs if r["ttft_ms_p99"] > 19] + [_run("none", 5, 5, 21)])
    assert "note" in none_good and len(none_good["at_each_rate"]) == 2
    table = markdown({"runs": runs, "summary": summary})
    assert table.count("\n| single |") == 5


def test_a_real_report_follows_the_schema(tmp_path):
    """The report ``run`` writes (rows from outcomes, config as run) against the schema."""
    import json
    from dataclasses import asdict
    from pathlib import Path

    import jsonschema

    from rcllm_sdk.evaluation.bench_load import LoadConfig, _write

    runs = [{**_run("none", 10, 10, 15), **row([_ok(10.0)], 1.0, (1.0, 1.0)), "routing": "single"}]
    report = {"config": asdict(LoadConfig()), "runs": runs, "summary": batching_gain(runs)}
    out = tmp_path / "load.json"
    _write(report, {"none @ 10 rps": [10.0, 12.0]}, out)
    schema = json.loads((Path(__file__).parents[1] / "evaluation/schemas/bench_load.schema.json").read_text())
    jsonschema.validate(json.loads(out.read_text()), schema)
    assert out.with_suffix(".md").exists() and out.with_suffix(".png").stat().st_size > 0


def test_routing_gain_compares_affinity_with_round_robin_at_each_rate():
    from rcllm_sdk.evaluation.bench_load import routing_gain, touched_blocks

    runs = [
        {**_run("continuous:8", 50, 49, 30), "routing": "round_robin", "local_hit_rate": 0.2},
        {**_run("continuous:8", 50, 49, 28), "routing": "affinity", "local_hit_rate": 0.5},
        {**_run("continuous:8", 90, 80, 60), "routing": "round_robin", "local_hit_rate": 0.2},
    ]
    (gain,) = routing_gain(runs)  # 90 rps has no affinity run
    assert gain["hit_rate_ratio"] == 2.5 and gain["ttft_ms_p99"] == [30, 28]
    bodies = [{"user_id": 1, "candidates": [5, 6]}, {"user_id": 2, "candidates": [6, 7]}]
    assert touched_blocks(bodies, 100) == 1 + 2 + 3  # system, users, items
    assert touched_blocks([{"user_id": 1}], 100) == 1 + 1 + 100  # the retriever may pick any item
