"""The serving simulator (``evaluation/simulate.py``) on cases with known answers."""

from __future__ import annotations

import pytest

from rcllm_sdk.evaluation.simulate import Costs, Workload, simulate


def test_an_idle_system_answers_in_one_batch_s_cost():
    result = simulate(Costs(3.0, 2.0), rate_rps=0.5, workload=Workload(users=50, items=200), n_requests=200)
    assert result["ttft_ms_p50"] == pytest.approx(5.0)
    assert result["mean_batch_size"] == pytest.approx(1.0, abs=0.02)


def test_overload_builds_batches_and_queues():
    light = simulate(Costs(3.0, 2.0), 50, Workload(users=50, items=200), n_requests=2000)
    heavy = simulate(Costs(3.0, 2.0), 400, Workload(users=50, items=200), n_requests=2000)
    assert heavy["mean_batch_size"] > light["mean_batch_size"] >= 1.0
    assert heavy["ttft_ms_p50"] > light["ttft_ms_p50"]


def test_affinity_routing_keeps_more_blocks_local_than_round_robin():
    workload = Workload(users=400, items=2000, candidates=10)

    def hit_rate(routing):
        result = simulate(Costs(1.0, 1.0, 0.1), 200, workload, 4, routing, tier_blocks=400, n_requests=4000)
        return result["local_hit_rate"]

    assert hit_rate("affinity") > hit_rate("round_robin")
