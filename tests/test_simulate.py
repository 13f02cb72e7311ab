"""The serving simulator (``evaluation/simulate.py``) on cases with known answers."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import polars as pl
import pytest

from rcllm_sdk.evaluation.bench_load import LoadConfig, run_bodies
from rcllm_sdk.evaluation.simulate import (
    Cluster,
    Costs,
    Shape,
    blocks_of,
    check_row,
    fit_line,
    fit_per_request,
    markdown,
    phases,
    poisson_ms,
    synthetic,
)

SHAPE = Shape(
    item_tokens=10,
    user_tokens=30,
    prefix_tokens=40,
    prompt_tokens=300,
    recompute_tokens=50,
    bytes_per_token=100,
)
WORLD = {"users": 300, "items": 1500, "candidates": 10}


def test_a_lone_request_takes_one_batch_s_service_time():
    costs = Costs(per_batch_ms=3.0, per_request_ms=2.0, per_token_ms=0.01, per_byte_ms=1e-4, per_block_ms=0.1)
    request = blocks_of(1, range(20))  # 21 blocks, all stored in the one process: shifted, not fetched
    cluster = Cluster(costs, SHAPE, warm=True)
    result = cluster.run([request] * 20, np.arange(20) * 1000.0)  # 1/s: never queued
    assert result["ttft_ms_p50"] == pytest.approx(3.0 + 2.0 + 0.01 * 50 + 0.1 * 21)
    assert result["mean_batch_size"] == 1.0
    assert result["local_hit_rate"] == 1.0


def test_prefix_caching_recomputes_after_the_prefix_and_shifts_nothing():
    costs = Costs(per_token_ms=0.01, per_block_ms=0.1)
    cluster = Cluster(costs, SHAPE, mode="prefix", warm=True)
    result = cluster.run([blocks_of(1, range(20))], [0.0])
    assert result["ttft_ms_p50"] == pytest.approx(0.01 * (300 - 40))


def test_a_batch_computes_a_missing_block_once():
    costs = Costs(per_token_ms=1.0, per_byte_ms=0.001)
    a, b = blocks_of(1, [7]), blocks_of(2, [7])  # two users, one shared item, nothing stored
    together = Cluster(costs, SHAPE).service_ms(0, [a, b])
    tokens = 2 * 50 + 2 * 30 + 10  # recomputed per request, both users' blocks, the item once
    assert together == pytest.approx(tokens * 1.0 + (2 * 30 + 10) * 100 * 0.001)
    apart = Cluster(costs, SHAPE)
    first, second = apart.service_ms(0, [a]), apart.service_ms(0, [b])  # the item is stored by then
    assert first == pytest.approx((50 + 30 + 10) * 1.0 + (30 + 10) * 100 * 0.001)
    assert second == pytest.approx((50 + 30) * 1.0 + 30 * 100 * 0.001)  # the item is local now


def test_queued_requests_share_a_batch_up_to_max_batch():
    cluster = Cluster(Costs(per_batch_ms=10.0), SHAPE, batch=4, warm=True)
    result = cluster.run([blocks_of(u, [u]) for u in range(9)], np.zeros(9))  # all at once
    assert result["mean_batch_size"] == pytest.approx(3.0)  # 1 (alone), 4, 4
    assert result["ttft_ms_p50"] == pytest.approx(20.0)


def test_a_higher_per_byte_cost_raises_ttft_when_tiers_are_small():
    stream, arrivals = synthetic(2000, 0, **WORLD), poisson_ms(100.0, 2000, 1)

    def p50(per_byte, tier, replicas=4):
        costs = Costs(1.0, 0.5, 0.001, per_byte, 0.01)
        cluster = Cluster(costs, SHAPE, replicas, "round_robin", 8, tier, warm=True)
        return cluster.run(stream, arrivals)["ttft_ms_p50"]

    assert p50(1e-4, tier=50) > p50(1e-5, tier=50)
    assert p50(1e-4, tier=0, replicas=1) == p50(1e-5, tier=0, replicas=1)  # one process: all local


def test_affinity_routing_keeps_more_blocks_local_than_round_robin():
    stream, arrivals = synthetic(3000, 0, **WORLD), poisson_ms(200.0, 3000, 1)

    def hit_rate(routing):
        cluster = Cluster(Costs(1.0, 1.0, 0.001, 1e-6, 0.01), SHAPE, 4, routing, 8, 300, warm=True)
        return cluster.run(stream, arrivals)["local_hit_rate"]

    assert hit_rate("affinity") > hit_rate("round_robin")


def test_the_fits_recover_known_costs():
    slope, intercept = fit_line([100, 200, 400], [0.5 + 0.02 * n for n in (100, 200, 400)])
    assert (slope, intercept) == (pytest.approx(0.02), pytest.approx(0.5))
    stream, arrivals = synthetic(800, 0, **WORLD), poisson_ms(40.0, 800, 1)

    def p50(per_request):
        costs = Costs(2.0, per_request, 0.01, 1e-5, 0.05)
        return Cluster(costs, SHAPE, 2, "affinity", 8, 200).run(stream, arrivals)["ttft_ms_p50"]

    assert fit_per_request(p50, p50(7.0)) == pytest.approx(7.0, rel=0.02)


def test_check_rows_and_their_table():
    row = check_row(20.0, "affinity", "continuous:8", measured=100.0, simulated=110.0, fitted=False)
    assert row["error"] == pytest.approx(0.10)
    assert check_row(10.0, "single", "none", 80.0, 60.0, True)["error"] == pytest.approx(-0.25)
    projection = {"replicas": 8, "routing": "affinity", "rate_rps": 40.0, "rcllm_ttft_ms_p50": 12.0}
    projection |= {"rcllm_ttft_ms_p99": 30.0, "prefix_ttft_ms_p50": 20.0, "prefix_ttft_ms_p99": 50.0}
    text = markdown({"checks": [row], "projections": [projection | {"rcllm_local_hit_rate": 0.5}]})
    assert "| 20 | affinity | continuous:8 | 100.0 | 110.0 | +10.0% |" in text
    assert "| 8 | affinity | 40 | 12.0 | 30.0 | 20.0 | 50.0 | 0.50 |" in text


def test_phases_replay_bench_load_s_requests_and_send_times(tmp_path):
    (tmp_path / "data").mkdir()
    pl.DataFrame({"user_id": list(range(1, 51))}).write_parquet(tmp_path / "data" / "user_history.parquet")
    pl.DataFrame({"item_id": list(range(100, 400))}).write_parquet(tmp_path / "data" / "items.parquet")
    config = LoadConfig(repo=str(tmp_path), rates=[10.0, 20.0], requests=6, warmup=3, seed=4)
    stream = phases(config, lambda bodies: [blocks_of(b["user_id"], b["candidates"]) for b in bodies])
    timed = [(rate, blocks, at) for rate, blocks, at in stream if rate is not None]
    assert [rate for rate, _, _ in timed] == [10.0, 20.0] and len(stream) == 7  # prewarm first
    every_block = set().union(*(blocks for _, bs, _ in stream[1:] for blocks in bs))
    assert set().union(*stream[0][1]) == every_block  # the prewarm reads every block of the run
    no_prewarm = phases(replace(config, prewarm=False), lambda bodies: [frozenset(b) for b in bodies])
    assert len(no_prewarm) == 6
    body = run_bodies(config)[1][1][3]  # rate 20's first timed request
    assert timed[1][1][0] == blocks_of(body["user_id"], body["candidates"])
    gaps = np.random.default_rng(4 + 100 + 1).exponential(1 / 20.0, 6)  # bench-load's seed for it
    np.testing.assert_allclose(timed[1][2], np.cumsum(gaps) * 1000.0)
