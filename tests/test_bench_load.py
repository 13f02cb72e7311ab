"""``rcllm bench-load``'s pure parts on hand-written outcomes: Zipf draws, a report row, the
batching comparison and the markdown (the load run itself is exercised by the HTTP tests'
server; its figures belong in the benchmark's report, not in assertions)."""

from __future__ import annotations

import numpy as np

from rcllm_sdk.evaluation.bench_load import batching_gain, markdown, row, zipf_draws


def test_zipf_draws_favour_one_value_per_rank_and_stay_in_range():
    draws = zipf_draws(50, 5000, 1.0, np.random.default_rng(0))
    counts = np.bincount(draws, minlength=50)
    assert draws.min() >= 0 and draws.max() < 50
    top = np.sort(counts)[::-1]
    assert top[0] > 3 * top[9] > 0  # rank 1 ~ 10x rank 10 under s = 1


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
