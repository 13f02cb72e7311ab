"""Serving with cached KV through the facade: modes against ``full``, cache figures, threads,
a store that is down, ``rcllm refresh`` and the benchmark's report shape."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from rcllm_sdk import RcRecommender


def _users(repo, n):
    import polars as pl

    return pl.read_parquet(repo / "data" / "user_history.parquet")["user_id"].sort().to_list()[:n]


def _same_ranking(a, b, atol=1e-4):
    assert a.item_ids == b.item_ids
    assert np.allclose(a.scores, b.scores, atol=atol)


def test_prefix_and_rcllm_with_full_policy_rank_exactly_as_full(trained_repo):
    repo, _ = trained_repo
    users = _users(repo, 6)
    full = RcRecommender.from_feature_store(repo, mode="full").recommend_batch(users, k=10)
    for mode, policy in (("prefix", "block_head:4"), ("rcllm", "full")):
        with RcRecommender.from_feature_store(
            repo, mode=mode, policy=policy, store="memory://", guard=False
        ) as rec:
            cold = rec.recommend_batch(users, k=10)
            warm = rec.recommend_batch(users, k=10)
        for f, c, w in zip(full, cold, warm, strict=False):
            _same_ranking(c, f)
            _same_ranking(w, f)
            assert c.mode == mode and c.cache.hits + c.cache.misses > 0
            assert w.cache.hits > 0 and w.cache.kv_bytes_read > 0


def test_rcllm_serves_from_cached_blocks_and_reports_it(trained_repo):
    repo, _ = trained_repo
    user = _users(repo, 1)[0]
    with RcRecommender.from_feature_store(repo, store="memory://", guard=False) as rec:  # reuse always
        first, second = rec.recommend(user), rec.recommend(user)
    assert rec.config.mode == "rcllm" and first.mode == "rcllm"
    blocks = 2 + len(first.candidates)  # system, user, one per item
    assert (first.cache.hits, first.cache.misses) == (0, blocks)
    assert (second.cache.hits, second.cache.misses) == (blocks, 0)
    assert 0 < second.cache.recomputed_fraction < 1 and second.cache.kv_bytes_read > 0
    assert first.item_ids == second.item_ids  # a miss is computed like a stored block: same ranking


def test_the_guard_serves_full_prefill_and_says_so(trained_repo):
    """A cost model under which reuse never pays: every prompt runs the plain forward, ranks
    exactly as ``full`` mode and is reported as such; one under which it always pays reuses."""
    from rcllm_sdk.runtime.guard import CostModel

    repo, _ = trained_repo
    users = _users(repo, 3)
    full = RcRecommender.from_feature_store(repo, mode="full").recommend_batch(users, k=10)
    with RcRecommender.from_feature_store(repo, store="memory://") as rec:
        assert rec.engine.cost_model is not None  # measured when the recommender was built
        rec.engine.cost_model = CostModel(0.0, 0.0, 1e9, 0.0, 0.0)  # reuse never pays
        guarded = rec.recommend_batch(users, k=10)
        rec.engine.cost_model = CostModel(1e9, 0.0, 0.0, 0.0, 0.0)  # reuse always pays
        reused = rec.recommend_batch(users, k=10)
    for f, g, r in zip(full, guarded, reused, strict=True):
        assert g.item_ids == f.item_ids and g.scores == f.scores  # the same forward: bit-identical
        assert g.mode == "full" and g.cache.fallback_full and g.cache.hits + g.cache.misses == 0
        assert r.mode == "rcllm" and not r.cache.fallback_full and r.cache.hits + r.cache.misses > 0


def test_recommend_is_safe_from_several_threads(trained_repo):
    repo, _ = trained_repo
    users = _users(repo, 12)
    with RcRecommender.from_feature_store(repo, store="memory://") as rec:
        expected = {u: rec.recommend(u).item_ids for u in users}
        got, errors = {}, []

        def work(chunk):
            try:
                for u in chunk:
                    got[u] = rec.recommend(u).item_ids
            except Exception as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(users[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors and got == expected


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_store_that_is_down_degrades_to_computing(trained_repo):
    repo, _ = trained_repo
    users = _users(repo, 3)
    full = RcRecommender.from_feature_store(repo, mode="full").recommend_batch(users)
    with RcRecommender.from_feature_store(
        repo, policy="full", store=f"lm://127.0.0.1:{_free_port()}", guard=False
    ) as rec:
        got = rec.recommend_batch(users)
        assert rec.engine.store.stats.errors > 0
    for f, g in zip(full, got, strict=False):
        _same_ranking(g, f)
        assert g.cache.hits == 0


def test_refresh_fills_a_persistent_store_that_serving_then_hits(trained_repo, tmp_path):
    from rcllm_sdk.cli import main

    repo, _ = trained_repo
    store = f"fs://{tmp_path / 'kv'}"
    assert main(["refresh", "--repo", str(repo), "--store", store]) == 0
    with RcRecommender.from_feature_store(repo, store=store, guard=False) as rec:
        result = rec.recommend(_users(repo, 1)[0])
    assert result.cache.misses == 0 and result.cache.hits == 2 + len(result.candidates)


def test_bench_report_follows_its_schema(tmp_path):
    import jsonschema

    from rcllm_sdk.evaluation.bench import run_bench
    from rcllm_sdk.evaluation.bench_config import BenchConfig, StreamConfig

    config = BenchConfig(
        model="tiny",
        warm_samples={"reference": 2, "long_item": 1},
        cold_samples={"reference": 1, "long_item": 1},
        store="memory://",
        other_policies=["none"],
        ab_attention="torch",
        stream=StreamConfig(items=300),
    )
    report = run_bench(config, tmp_path / "bench.json", progress=False)
    schema = json.loads(
        (Path(__file__).parents[1] / "evaluation" / "schemas" / "bench.schema.json").read_text()
    )
    jsonschema.validate(json.loads((tmp_path / "bench.json").read_text()), schema)
    assert (tmp_path / "bench.md").read_text().startswith("| workload | mode |")
    ref = report["workloads"]["reference"]
    assert set(ref["modes"]) == {"full", "prefix", "rcllm", "rcllm:none", "rcllm@torch"}
    assert ref["modes"]["rcllm@torch"]["max_abs_logit_diff_vs_rcllm"] == 0.0  # on CPU auto is the torch path
    assert ref["modes"]["full"]["recompute_fraction"] == 1.0
    assert ref["modes"]["rcllm:none"]["recompute_fraction"] < ref["modes"]["rcllm"]["recompute_fraction"] < 1
    assert ref["modes"]["prefix"]["prefix_hit_fraction"] > 0  # warm: system + history prefix stored
    assert ref["cold"]["modes"]["prefix"]["prefix_hit_fraction"] == 0
    assert 55 <= ref["item_block_tokens_mean"] <= 75


def test_bench_sweep_report_follows_its_schema(tmp_path):
    import jsonschema

    from rcllm_sdk.evaluation.bench import main

    out = tmp_path / "sweep.json"
    argv = ["--sweep", "--model", "tiny", "--store", "memory://", "--out", str(out)]
    assert (
        main(argv + ["--sweep-tokens", "4", "16", "--sweep-candidates", "10", "--sweep-requests", "2"]) == 0
    )
    schema = json.loads(
        (Path(__file__).parents[1] / "evaluation" / "schemas" / "bench.schema.json").read_text()
    )
    report = json.loads(out.read_text())
    jsonschema.validate(report, schema)
    rows = report["sweep"]
    assert [(r["target_tokens_per_item"], r["candidates"]) for r in rows] == [(4, 10), (16, 10)]
    assert rows[0]["tokens_per_item"] < rows[1]["tokens_per_item"]
    assert rows[1]["recomputed"] < rows[0]["recomputed"] < 1
    assert set(rows[0]["ttft_ms_p50"]) == {"full", "prefix", "rcllm", "reuse", "floor"}
    stages = report["profile"]["stages_ms"]
    assert {"store read + codec", "attention (per layer)", "mlp", "re-rotation (all layers)"} <= set(stages)
    assert "| rcllm / full |" in out.with_suffix(".md").read_text()


def test_default_policy_is_the_same_everywhere():
    from rcllm_sdk.config import RecommenderConfig
    from rcllm_sdk.evaluation import bench_config
    from rcllm_sdk.runtime import policies

    assert bench_config.DEFAULT_POLICY == policies.DEFAULT_POLICY == RecommenderConfig().policy


@pytest.mark.parametrize("name", ["bench", "evaluate"])
def test_committed_example_reports_follow_their_schemas(name):
    import jsonschema

    folder = Path(__file__).parents[1] / "evaluation"
    schema = json.loads((folder / "schemas" / f"{name}.schema.json").read_text())
    jsonschema.validate(json.loads((folder / "examples" / f"{name}.example.json").read_text()), schema)


def test_place_then_refresh_into_a_cluster_then_serve_from_it(trained_repo, tmp_path):
    """`rcllm place` from the Feast item view, `rcllm refresh` into a cluster store, then
    serving reads the blocks from their nodes and ranks as the local store does."""
    import uuid

    from rcllm_sdk.cache.placement import ShardMap
    from rcllm_sdk.cli import main

    repo, _ = trained_repo
    assert main(["place", "--repo", str(repo), "--out", str(tmp_path / "map.json"), "--shards", "3"]) == 0
    shard_map = ShardMap.load(tmp_path / "map.json")
    sizes = shard_map.sizes()
    assert shard_map.method == "similarity" and sizes.max() <= 1.1 * sizes.mean() + 1
    assert main(["place", "--repo", str(repo), "--out", str(tmp_path / "map.json")]) == 0  # nothing new
    assert ShardMap.load(tmp_path / "map.json") == shard_map
    nodes = [f"memory://{uuid.uuid4().hex}" for _ in range(3)]
    (tmp_path / "cluster.json").write_text(
        json.dumps({"nodes": nodes, "shard_map": "map.json", "replicas": 1, "local": "memory://"})
    )
    url = f"cluster://{tmp_path / 'cluster.json'}"
    assert main(["refresh", "--repo", str(repo), "--store", url]) == 0
    user = _users(repo, 1)[0]
    with RcRecommender.from_feature_store(repo, store=url, guard=False) as rec:
        served = rec.recommend(user)
    with RcRecommender.from_feature_store(repo, store="memory://", guard=False) as rec:
        local = rec.recommend(user)
    _same_ranking(served, local, atol=1e-5)
    assert served.cache.misses == 0 and served.cache.local_hits == 0
    assert served.cache.nodes_touched >= 1 and served.cache.remote_bytes == served.cache.kv_bytes_read
