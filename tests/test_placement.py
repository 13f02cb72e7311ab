"""Item placement: balance, locality against hash, purity of shard_for, the JSON form, add/rebalance."""

import json
from pathlib import Path

import numpy as np
import pytest

from rcllm_sdk.cache.placement import (
    ShardMap,
    add_items,
    balance_bounds,
    hash_placement,
    hash_shard,
    rebalance,
    shard_for,
    similarity_placement,
)
from rcllm_sdk.errors import ConfigError


def clustered(n: int, n_clusters: int, dim: int = 16, seed: int = 0, weights=None) -> np.ndarray:
    """``[n, dim]`` unit vectors scattered around ``n_clusters`` random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim))
    labels = rng.choice(n_clusters, size=n, p=weights)
    x = centres[labels] + 0.35 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def neighbour_shards(shard_map: ShardMap, ids: np.ndarray, x: np.ndarray, k: int = 20) -> float:
    """Mean distinct shards among each item's ``k`` nearest neighbours (cosine)."""
    neighbours = np.argsort(-(x @ x.T), axis=1)[:, 1 : k + 1]
    shards = np.array([shard_map.shard_for(int(i)) for i in ids])
    return float(np.mean([len(set(shards[row])) for row in neighbours]))


IDS = np.arange(1000, 2200)
X = clustered(len(IDS), 12)
TWO_GROUPS = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]], np.float32)  # ids 1,2 | 3,4


# ---- similarity placement ----------------------------------------------------------------------
def test_two_obvious_groups_land_on_two_shards():
    m = similarity_placement([1, 2, 3, 4], TWO_GROUPS, 2)
    assert m.shard_for(1) == m.shard_for(2) != m.shard_for(3) == m.shard_for(4)
    assert m.method == "similarity" and m.version == 1 and m.centroids.shape == (2, 2)


def test_balance_bounds_are_strict_when_feasible():
    assert balance_bounds(100, 4, 0.10) == (23, 27)  # 25 * 0.9 = 22.5 -> 23, 25 * 1.1 = 27.5 -> 27
    assert balance_bounds(40, 4, 0.10) == (9, 11)  # 11.000000000000002 must not round to 12
    assert balance_bounds(10, 3, 0.10) == (3, 4)  # band [3.0, 3.67] holds no split of 10: widened


@pytest.mark.parametrize("n_shards", [4, 8, 16])
def test_similarity_placement_keeps_every_shard_within_ten_percent(n_shards):
    m = similarity_placement(IDS, X, n_shards)
    sizes = m.sizes()
    mean = len(IDS) / n_shards
    assert sizes.sum() == len(IDS)
    assert 0.9 * mean <= sizes.min() and sizes.max() <= 1.1 * mean, sizes


@pytest.mark.parametrize("n_shards", [4, 8])
def test_balance_holds_when_one_natural_cluster_holds_sixty_percent(n_shards):
    x = clustered(1000, 6, weights=[0.6, 0.08, 0.08, 0.08, 0.08, 0.08], seed=1)
    sizes = similarity_placement(np.arange(1000), x, n_shards).sizes()
    assert 0.9 * 1000 / n_shards <= sizes.min() and sizes.max() <= 1.1 * 1000 / n_shards, sizes


def test_near_neighbours_share_shards_far_more_often_than_under_hash():
    similarity = neighbour_shards(similarity_placement(IDS, X, 8), IDS, X)
    hashed = neighbour_shards(hash_placement(IDS, 8), IDS, X)
    assert hashed > 7.0  # 20 random items over 8 shards: 8 * (1 - (7/8)**20) = 7.45
    assert similarity * 2 <= hashed, (similarity, hashed)


def test_placement_is_deterministic_for_a_seed():
    assert similarity_placement(IDS, X, 8, seed=3).map_id == similarity_placement(IDS, X, 8, seed=3).map_id


def test_items_with_zero_embeddings_are_placed_and_balance_holds():
    x = X.copy()
    x[::5] = 0.0  # a fifth of the items never seen in training
    m = similarity_placement(IDS, x, 8)
    assert set(m.item_shard) == set(IDS.tolist())
    low, high = balance_bounds(len(IDS), 8)
    assert low <= m.sizes().min() and m.sizes().max() <= high


def test_all_zero_embeddings_still_give_a_balanced_map():
    m = similarity_placement(np.arange(50), np.zeros((50, 4)), 4)
    assert sorted(m.sizes().tolist()) == [12, 12, 13, 13]


@pytest.mark.parametrize(
    "args, message",
    [
        (([1, 2, 3], np.ones((3, 2)), 0), "n_shards must be an integer >= 1"),
        (([1, 2, 3], np.ones((3, 2)), 4), "more than the 3 items"),
        (([1, 2, 3], np.ones((2, 2)), 2), "embeddings must be \\[n_items, dim\\] with n_items=3"),
        (([1, 2, 3], np.ones(3), 2), "embeddings must be"),
        (([1, 2, 3], np.array([[1.0, np.nan], [0, 1], [1, 1]]), 2), "1 rows with NaN or inf"),
        (([1, 1, 3], np.ones((3, 2)), 2), "duplicates"),
        (([1.5, 2, 3], np.ones((3, 2)), 2), "integers"),
    ],
)
def test_bad_inputs_raise_config_error_saying_what_is_wrong(args, message):
    with pytest.raises(ConfigError, match=message):
        similarity_placement(*args)


def test_bad_slack_and_hash_shard_counts_are_rejected():
    with pytest.raises(ConfigError, match="slack"):
        similarity_placement([1, 2], TWO_GROUPS[:2], 1, slack=1.5)
    with pytest.raises(ConfigError, match="more than the 2 items"):
        hash_placement([1, 2], 3)


# ---- shard_for, map_id, JSON -------------------------------------------------------------------
def test_hash_shard_is_pinned_blake2b_not_python_hash():
    # Pinned values: changing the hash would move every hash-placed item.
    assert [hash_shard(i, 8) for i in (0, 1, 1193, -5, 2**40)] == [2, 3, 6, 1, 1]
    assert hash_shard(np.int64(1193), 8) == 6


def test_shard_for_is_pure_and_survives_save_and_load(tmp_path):
    m = similarity_placement(IDS, X, 8)
    m.save(tmp_path / "map.json")
    fresh = ShardMap.load(tmp_path / "map.json")
    probe = IDS.tolist() + [7, 99_999_999, -3]  # the last three are unknown to the map
    assert [fresh.shard_for(i) for i in probe] == [shard_for(i, m) for i in probe]
    assert fresh.map_id == m.map_id and fresh == m
    assert fresh.shard_for(99_999_999) == hash_shard(99_999_999, 8)  # unknown ids: deterministic home


def test_hash_placement_places_every_id_by_the_stable_hash():
    m = hash_placement(IDS, 4)
    assert m.item_shard == {} and m.centroids is None
    assert [m.shard_for(i) for i in (0, 1, 1193)] == [hash_shard(i, 4) for i in (0, 1, 1193)]
    assert m.sizes(IDS).sum() == len(IDS) and m.sizes().sum() == 0


def test_map_id_changes_with_assignment_version_and_shard_count():
    base = ShardMap("similarity", 2, 1, {1: 0, 2: 1}, np.eye(2))
    assert ShardMap("similarity", 2, 1, {1: 0, 2: 1}, np.eye(2)).map_id == base.map_id
    others = [
        ShardMap("similarity", 2, 1, {1: 1, 2: 0}, np.eye(2)),  # assignment
        ShardMap("similarity", 2, 2, {1: 0, 2: 1}, np.eye(2)),  # version
        ShardMap("similarity", 2, 1, {1: 0, 2: 1, 3: 0}, np.eye(2)),  # one more item
        ShardMap("similarity", 2, 1, {1: 0, 2: 1}, 2 * np.eye(2)),
    ]  # centroids
    assert len({base.map_id} | {o.map_id for o in others}) == 5
    assert hash_placement([1, 2, 3], 2).map_id != hash_placement([1, 2, 3], 3).map_id
    assert len(base.map_id) == 16 and int(base.map_id, 16) >= 0


def test_json_round_trip_keeps_everything(tmp_path):
    m = similarity_placement(IDS, X, 4, slack=0.05)
    m.save(tmp_path / "m.json")
    back = ShardMap.load(tmp_path / "m.json")
    assert dict(back.item_shard) == dict(m.item_shard) and back.slack == 0.05 and back.version == 1
    np.testing.assert_array_equal(back.centroids, m.centroids)
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temp file left behind
    hash_placement(IDS, 4).save(tmp_path / "h.json")
    assert ShardMap.load(tmp_path / "h.json") == hash_placement(IDS, 4)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "cannot read shard map"),
        (json.dumps({"format": "something-else", "format_version": 1}), "is not a shard map"),
        (json.dumps({"format": "rcllm-shard-map", "format_version": 99}), "is not a shard map"),
        (json.dumps({"format": "rcllm-shard-map", "format_version": 1, "method": "hash"}), "malformed"),
    ],
)
def test_load_rejects_corrupt_or_foreign_files_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as err:
        ShardMap.load(path)
    assert str(path) in str(err.value)


def test_load_rejects_a_map_with_shards_out_of_range(tmp_path):
    doc = ShardMap("similarity", 2, 1, {1: 0, 2: 1}, np.eye(2))._to_json()
    doc["shards"] = [0, 5]
    (tmp_path / "m.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="outside 0..1"):
        ShardMap.load(tmp_path / "m.json")
    with pytest.raises(ConfigError, match="m.json"):
        ShardMap.load(tmp_path / "missing" / "m.json")


def test_a_shard_map_cannot_be_mutated():
    m = ShardMap("similarity", 2, 1, {1: 0, 2: 1}, np.eye(2))
    with pytest.raises(TypeError):
        m.item_shard[1] = 1
    with pytest.raises(ValueError):
        m.centroids[0, 0] = 5.0


# ---- add_items and rebalance -------------------------------------------------------------------
def test_add_items_keeps_old_assignments_and_respects_room():
    m = similarity_placement(IDS[:800], X[:800], 4)
    crowd = np.repeat(m.centroids[:1], 200, axis=0)  # 200 new items, all nearest to shard 0
    grown = add_items(m, np.arange(5000, 5200), crowd)
    _, high = balance_bounds(1000, 4)
    assert grown.version == 2 and grown.sizes().sum() == 1000
    assert (
        grown.sizes().max() <= high and grown.sizes()[0] == high
    )  # shard 0 filled up, then the rest went elsewhere
    assert all(grown.item_shard[i] == s for i, s in m.item_shard.items())


def test_add_items_puts_a_new_item_on_its_nearest_shard_and_skips_known_ids():
    m = similarity_placement([1, 2, 3, 4], TWO_GROUPS, 2, slack=0.5)
    grown = add_items(m, [2, 9], np.array([[0.0, 1.0], [0.05, 0.95]]))
    assert grown.shard_for(9) == m.shard_for(3) and grown.shard_for(2) == m.shard_for(2)
    assert add_items(m, [1, 2], TWO_GROUPS[:2]) is m  # nothing new: same map, same version
    h = hash_placement([1, 2], 2)
    assert add_items(h, [3], np.ones((1, 2))) is h
    with pytest.raises(ConfigError, match="dim 3 but the shard map's centroids have dim 2"):
        add_items(m, [9], np.ones((1, 3)))


def test_rebalance_moves_the_fewest_and_cheapest_items():
    # Shard 0 holds six items, shard 1 two; n=8 on 2 shards must be exactly 4 + 4: two moves.
    x = np.array([[1, 0], [1, 0], [1, 0], [1, 0], [0.6, 0.4], [0.3, 0.7], [0, 1], [0, 1]], np.float32)
    ids = list(range(10, 18))
    skewed = ShardMap("similarity", 2, 3, {i: (0 if i < 16 else 1) for i in ids}, np.eye(2))
    fixed, moves = rebalance(skewed, ids, x)
    assert moves == {15: (0, 1), 14: (0, 1)}  # the two items nearest shard 1's centroid
    assert fixed.version == 4 and fixed.sizes().tolist() == [4, 4]
    assert all(fixed.shard_for(i) == skewed.shard_for(i) for i in ids if i not in moves)


def test_rebalance_sends_excess_to_short_shards_first():
    # slack 0.5, 12 items on 3 shards: bounds [2, 6]. Sizes 9, 2, 1: three moves suffice only if
    # one of them fills shard 2, although shard 1 is the cheaper destination for all three (and
    # item 10 would be the cheapest to pull into shard 2 afterwards: a fourth move).
    x = np.array([[1, 0, 0]] * 6 + [[0.3, 0.7, 0]] * 3 + [[0, 1, 0], [0, 0.5, 0.5], [0, 0, 1]], np.float32)
    skewed = ShardMap(
        "similarity", 3, 1, {i: (0 if i < 9 else 1 if i < 11 else 2) for i in range(12)}, np.eye(3), slack=0.5
    )
    fixed, moves = rebalance(skewed, range(12), x)
    assert moves == {6: (0, 2), 7: (0, 1), 8: (0, 1)} and fixed.sizes().tolist() == [6, 4, 2]


def test_rebalance_fills_a_short_shard_with_the_cheapest_items():
    # Bounds [2, 6]; shard 2 is empty and pulls the one item of each full shard that leans its way.
    x = np.array([[1, 0, 0]] * 5 + [[0.5, 0, 0.5]] + [[0, 1, 0]] * 5 + [[0, 0.4, 0.6]], np.float32)
    skewed = ShardMap("similarity", 3, 1, {i: int(i >= 6) for i in range(12)}, np.eye(3), slack=0.5)
    fixed, moves = rebalance(skewed, range(12), x)
    assert moves == {11: (1, 2), 5: (0, 2)} and fixed.sizes().tolist() == [5, 5, 2]


def test_rebalance_restores_bounds_after_growth_and_moves_only_what_it_must():
    m = similarity_placement(IDS[:600], X[:600], 8)
    crowd = m.centroids[2] + 0.01 * np.random.default_rng(0).normal(size=(600, X.shape[1]))
    grown = add_items(m, np.arange(9000, 9600), crowd)  # all new items crowd into one region
    ids = np.concatenate([IDS[:600], np.arange(9000, 9600)])
    x = np.concatenate([X[:600], crowd])
    low, high = balance_bounds(len(ids), 8)
    sizes = grown.sizes()
    assert sizes.min() < low or sizes.max() > high  # growth left it unbalanced
    fixed, moves = rebalance(grown, ids, x)
    needed = max(np.maximum(sizes - high, 0).sum(), np.maximum(low - sizes, 0).sum())
    assert len(moves) == needed
    assert low <= fixed.sizes().min() and fixed.sizes().max() <= high
    assert all(fixed.shard_for(int(i)) == grown.shard_for(int(i)) for i in ids if int(i) not in moves)
    assert all(grown.shard_for(i) == old and fixed.shard_for(i) == new for i, (old, new) in moves.items())


def test_rebalancing_a_balanced_map_moves_nothing():
    m = similarity_placement(IDS, X, 8)
    same, moves = rebalance(m, IDS, X)
    assert moves == {} and same is m
    h = hash_placement(IDS, 8)
    assert rebalance(h, IDS, X) == (h, {})


def test_rebalance_needs_embeddings_of_exactly_the_mapped_items():
    m = similarity_placement([1, 2, 3, 4], TWO_GROUPS, 2)
    with pytest.raises(ConfigError, match="not in the shard map .first: 9.; place them with add_items"):
        rebalance(m, [1, 2, 3, 9], TWO_GROUPS)
    with pytest.raises(ConfigError, match="all 4 mapped items, got 3"):
        rebalance(m, [1, 2, 3], TWO_GROUPS[:3])


# ---- the placement bench -----------------------------------------------------------------------
def test_request_footprint_counts_shards_and_remote_candidates():
    from rcllm_sdk.evaluation.bench_storage import request_footprint

    m = ShardMap("similarity", 3, 1, {1: 0, 2: 0, 3: 0, 4: 1, 5: 2}, np.eye(3))
    assert request_footprint(m, [1, 2, 3, 4, 5]) == (3, 2)  # runs beside shard 0; items 4 and 5 are remote
    assert request_footprint(m, [4, 5]) == (2, 1)  # a tie: one of the two is remote either way


def test_placement_rows_on_clustered_requests():
    from rcllm_sdk.evaluation.bench_storage import placement_markdown, placement_rows

    rng = np.random.default_rng(0)
    labels = np.argmax(X @ X[:12].T, axis=1)  # requests of 20 items drawn within one neighbourhood
    groups = [IDS[labels == g] for g in range(12) if (labels == g).sum() >= 20]
    requests = [rng.choice(groups[rng.integers(len(groups))], 20, replace=False).tolist() for _ in range(200)]
    rows = placement_rows("toy", IDS, X, requests, block_bytes=1000, shards=(4, 8))
    assert [(r["shards"], r["placement"]) for r in rows] == [
        (4, "similarity"),
        (4, "hash"),
        (8, "similarity"),
        (8, "hash"),
    ]
    for r in rows:
        assert r["dataset"] == "toy" and r["requests"] == 200
        assert 1.0 <= r["nodes_per_request"] <= r["shards"]
        assert 0 <= r["remote_bytes_per_request"] <= 19 * 1000
        assert r["min_over_mean_shard_size"] <= 1.0 <= r["max_over_mean_shard_size"]
    by = {(r["shards"], r["placement"]): r for r in rows}
    for s in (4, 8):
        similar, hashed = by[s, "similarity"], by[s, "hash"]
        assert similar["nodes_per_request"] < hashed["nodes_per_request"]
        assert similar["remote_bytes_per_request"] < hashed["remote_bytes_per_request"]
        assert 0.9 <= similar["min_over_mean_shard_size"] <= similar["max_over_mean_shard_size"] <= 1.1
    table = placement_markdown(rows)
    assert table.count("\n") == 5 and "| toy | 8 | similarity |" in table


def test_synthetic_dataset_is_built_the_way_ingest_builds_it():
    from rcllm_sdk.data.synthetic import SyntheticConfig
    from rcllm_sdk.evaluation.bench_storage import synthetic_dataset

    config = SyntheticConfig(n_users=60, n_items=120, n_categories=4, min_len=5, max_len=14, seed=3)
    ids, emb, requests = synthetic_dataset(config, max_users=25)
    assert emb.shape == (len(ids), 32) and emb.dtype == np.float32 and len(requests) == 25
    known = set(ids.tolist())
    assert all(len(r) == 20 and len(set(r)) == 20 and set(r) <= known for r in requests)


def test_missing_movielens_folder_is_reported_as_skipped(tmp_path):
    from rcllm_sdk.evaluation.bench_storage import movielens_1m_dataset, write_report

    assert movielens_1m_dataset(tmp_path / "no-such-folder") is None
    row = {
        "dataset": "synthetic",
        "shards": 4,
        "placement": "hash",
        "nodes_per_request": 3.9,
        "remote_bytes_per_request": 2**20,
        "max_over_mean_shard_size": 1.05,
        "min_over_mean_shard_size": 0.95,
        "requests": 10,
    }
    write_report({"results": [row], "skipped": ["ml-1m"]}, tmp_path / "out" / "storage.json")
    table = (tmp_path / "out" / "storage.md").read_text()
    assert "| synthetic | 4 | hash | 3.90 | 1.00x | 1.00 | 1.050 | 0.950 | 10 |" in table
    assert "ml-1m: skipped (data not found)" in table
    assert json.loads((tmp_path / "out" / "storage.json").read_text())["skipped"] == ["ml-1m"]


def test_bench_storage_report_follows_its_schema(tmp_path):
    """`rcllm bench-storage --skip-node-down` end to end on the synthetic world (ML-1M pointed at
    a missing folder, so the report lists it as skipped)."""
    import jsonschema

    from rcllm_sdk.cli import main

    out = tmp_path / "storage.json"
    assert (
        main(
            [
                "bench-storage",
                "--skip-node-down",
                "--shards",
                "4",
                "--max-users",
                "60",
                "--ml1m-path",
                str(tmp_path / "absent"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    schema = json.loads(
        (Path(__file__).parents[1] / "evaluation/schemas/bench_storage.schema.json").read_text()
    )
    jsonschema.validate(report, schema)
    assert report["skipped"] == ["ml-1m"] and {r["placement"] for r in report["results"]} == {
        "similarity",
        "hash",
    }
    assert "| synthetic | 4 | similarity |" in out.with_suffix(".md").read_text()
