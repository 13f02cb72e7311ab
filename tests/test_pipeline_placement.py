"""Re-placement on a cluster store: after ``ingest --append`` adds items, the pipeline's refresh
updates the cluster's shard map (new items placed by embedding similarity, re-balanced, one version
up, replaced atomically), records it in its MLflow run, and writes every item's block to its shard
under the new map; ``update_map`` itself on hand-made embeddings (drops, moves, a new basis)."""

import json
import uuid

import mlflow
import numpy as np
import polars as pl
from mlflow import MlflowClient

from rcllm_sdk import RcRecommender
from rcllm_sdk.cache import open_store
from rcllm_sdk.cache.placement import ShardMap, balance_bounds, similarity_placement
from rcllm_sdk.ingest import ingest
from rcllm_sdk.ingest_append import append_interactions
from rcllm_sdk.model.ranker import load_ranker
from rcllm_sdk.pipelines import registry
from rcllm_sdk.pipelines.pipeline import PipelineConfig, run_pipeline
from rcllm_sdk.pipelines.place import place_repo, update_map
from rcllm_sdk.pipelines.run import catalog_from_repo, data_cutoff, train_from_repo
from rcllm_sdk.pipelines.train import TrainConfig
from rcllm_sdk.prompt.encoder import cacheable_blocks
from rcllm_sdk.prompt.renderer import ITEM

TRAIN = TrainConfig(recipe="verbalizer", size="micro", steps=4, batch_size=4, vocab_size=600)
NODES = 4


def _cluster(folder) -> tuple[str, list[str]]:
    """A cluster.json of in-process nodes naming ``shard_map.json`` beside it; its URL and node spaces."""
    spaces = [uuid.uuid4().hex for _ in range(NODES)]
    doc = {
        "nodes": [f"memory://{s}" for s in spaces],
        "shard_map": "shard_map.json",
        "local": f"memory://{uuid.uuid4().hex}",
    }
    (folder / "cluster.json").write_text(json.dumps(doc))
    return f"cluster://{folder / 'cluster.json'}", spaces


def _new_items(repo, n: int, users: int = 40) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``n`` items the repo lacks, and interactions of the first ``users`` users with 3 of them each."""
    items = pl.read_parquet(repo / "data" / "items.parquet")
    first = items["item_id"].max() + 1
    new = pl.DataFrame(
        {
            "item_id": list(range(first, first + n)),
            "title": [f"Fresh Arrival {k}" for k in range(n)],
            "category": [items["category"][k % items.height] for k in range(n)],
            "text": [f"A new item number {k}" for k in range(n)],
        }
    )
    start = data_cutoff(repo) + 1
    user_ids = sorted(pl.read_parquet(repo / "data" / "interactions.parquet")["user_id"].unique())[:users]
    rows = [
        (u, first + (3 * k + j) % n, start + 10 * k + j) for k, u in enumerate(user_ids) for j in range(3)
    ]
    return new, pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row")


def _item_blocks(repo, model_dir) -> tuple[str, dict[int, int]]:
    """The model's fingerprint and each catalog item's block key."""
    ranker = load_ranker(model_dir)
    catalog = catalog_from_repo(repo)
    blocks = cacheable_blocks(
        [], list(catalog.values()), ranker.template, ranker.tokenizer, ranker.fingerprint
    )
    return ranker.fingerprint, {b.item_id: b.content_hash for b in blocks if b.kind == ITEM}


def _holders(spaces: list[str], fp: str, key: int) -> list[int]:
    found = []
    for node, space in enumerate(spaces):
        with open_store(f"memory://{space}", namespace=fp) as store:
            if store.contains(key):
                found.append(node)
    return found


def test_refresh_places_appended_items_on_the_cluster_and_writes_their_blocks_there(tmp_path):
    from conftest import TINY

    repo, name = tmp_path / "repo", f"ranker-{uuid.uuid4().hex[:6]}"
    ingest("synthetic", None, repo, synthetic=TINY)
    trained = train_from_repo(repo, config=TRAIN, progress=False, model_name=name)
    registry.set_champion(trained["version"], name)
    (tmp_path / "kv").mkdir()
    store, spaces = _cluster(tmp_path / "kv")
    map_path = tmp_path / "kv" / "shard_map.json"
    place_repo(repo, map_path, shards=NODES)
    built = ShardMap.load(map_path)

    def refresh() -> dict:
        config = PipelineConfig(repo, steps=("refresh",), store=store, model_name=name)
        return run_pipeline(config)["refresh"] | {"run": config.run_id}

    first = refresh()  # the map already holds every item: nothing re-placed
    assert first["shard_map_added"] == first["shard_map_moved"] == 0 and ShardMap.load(map_path) == built
    assert first["computed"] > 0

    new_items, interactions = _new_items(repo, 30)
    append_interactions(repo, interactions, new_items)
    out = refresh()

    shard_map = ShardMap.load(map_path)
    catalog = set(catalog_from_repo(repo))
    assert out["shard_map_added"] == 30 and set(shard_map.item_shard) == catalog
    assert shard_map.version == built.version + 1 and out["shard_map_id"] == shard_map.map_id
    assert dict(built.item_shard) != dict(shard_map.item_shard)
    low, high = balance_bounds(len(catalog), NODES, shard_map.slack)
    assert low <= shard_map.sizes().min() and shard_map.sizes().max() <= high
    assert sorted(p.name for p in map_path.parent.iterdir()) == ["cluster.json", "shard_map.json"]

    run = mlflow.search_runs(
        experiment_names=["rcllm-pipeline"], filter_string=f"tags.rcllm.pipeline_run = '{out['run']}'"
    ).iloc[0]
    assert run["metrics.shard_map_added"] == 30 and run["tags.rcllm.shard_map_id"] == shard_map.map_id
    assert run["metrics.shard_map_moved"] == out["shard_map_moved"]
    assert out["shard_map_moved"] > 0  # 30 new items leave some shards below the new lower bound
    moves = _moves(run["run_id"])
    assert len(moves) == out["shard_map_moved"]
    assert all(shard_map.shard_for(int(i)) == new for i, (_, new) in moves.items())

    # Every item's block is on its shard's node under the new map; new items nowhere else.
    fp, keys = _item_blocks(repo, trained["model_dir"])
    assert set(keys) == catalog
    for item, key in keys.items():
        holders = _holders(spaces, fp, key)
        assert shard_map.shard_for(item) % NODES in holders, item
        if item in set(new_items["item_id"]):
            assert holders == [shard_map.shard_for(item) % NODES]

    # A server opened now reads the new map and finds the nodes filled under it.
    with RcRecommender.from_feature_store(repo, model=trained["model_dir"], store=store, guard=False) as rec:
        assert rec.engine.store.config.shard_map == shard_map and rec.engine.store.stale_nodes == []
        assert rec.recommend(int(interactions["user_id"][0])).item_ids


def _moves(run_id: str) -> dict:
    path = MlflowClient().download_artifacts(run_id, "placement/moves.json")
    with open(path) as handle:
        return json.load(handle)


def _clusters(per: int = 10, shards: int = 4, dim: int = 8) -> tuple[list[int], np.ndarray]:
    rng = np.random.default_rng(0)
    centres = 5 * rng.normal(size=(shards, dim))
    rows = np.stack([centres[k // per] + 0.1 * rng.normal(size=dim) for k in range(per * shards)])
    return list(range(per * shards)), rows.astype(np.float32)


def test_update_map_drops_gone_items_and_rebalances_with_the_fewest_moves():
    ids, x = _clusters()
    old = similarity_placement(ids, x, 4)
    assert update_map(old, ids, x) == (old, {"added": 0, "dropped": 0, "moves": {}})
    shard = old.shard_for(ids[-1])
    gone = [i for i in ids if old.shard_for(i) == shard][:6]  # that shard keeps 4 of its 10
    kept = [i for i in ids if i not in gone]
    new, change = update_map(old, kept, x[kept])
    assert change["dropped"] == 6 and change["added"] == 0 and new.version == old.version + 1
    # 34 items on 4 shards may hold 8..9 each: 3 shards give 1 each, then one more: 4 moves, all in.
    assert len(change["moves"]) == 4 and all(to == shard for _, to in change["moves"].values())
    assert set(new.item_shard) == set(kept) and sorted(new.sizes()) == [8, 8, 9, 9]


def test_update_map_places_new_items_beside_their_neighbours_in_a_new_embedding_basis():
    ids, x = _clusters()
    old = similarity_placement(ids, x, 4)
    newcomer = len(ids)
    grown = np.concatenate([-x, -x[[5]] + 0.01])  # the next ingest's basis: every sign flipped
    new, change = update_map(old, [*ids, newcomer], grown)
    assert change["added"] == 1 and not change["moves"]
    assert new.shard_for(newcomer) == old.shard_for(5)  # beside item 5, as before the flip
