"""Stratified storage: placement of blocks on nodes, reads around faults, refresh, manifests
(in-process nodes), then the same on real servers: 3 LMCache servers and 2 Redis servers on
free 127.0.0.1 ports, a node killed mid-stream and a corrupt block on a node."""

from __future__ import annotations

import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
import torch

from rcllm_sdk.cache import open_store
from rcllm_sdk.cache.base import FAULT, LOCAL, MISS, REMOTE
from rcllm_sdk.cache.cluster import MANIFEST_KEY, ClusterConfig, ClusterStore, NodeSpec
from rcllm_sdk.cache.local_servers import start_lmcache, start_redis
from rcllm_sdk.cache.placement import similarity_placement
from rcllm_sdk.errors import ConfigError
from rcllm_sdk.runtime import blockkv
from rcllm_sdk.runtime.engine import BlockEngine
from rcllm_sdk.runtime.refresh import refresh_blocks

from .test_runtime import LABELS, Ranker, make_prompt, tiny_model
from .test_store import kv, same

ITEMS = list(range(100, 140))


def shard_map(n_shards: int = 4):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(n_shards, 8))
    emb = np.stack([centers[i % n_shards] + 0.05 * rng.normal(size=8) for i in range(len(ITEMS))])
    return similarity_placement(ITEMS, emb.astype(np.float32), n_shards)


def memory_cluster(
    n: int = 4, replicas: int = 0, namespace: str = "ns", spaces=None, **extra
) -> ClusterStore:
    spaces = spaces or [uuid.uuid4().hex for _ in range(n)]
    config = ClusterConfig(
        [NodeSpec(f"memory://{s}") for s in spaces],
        shard_map(n),
        replicas=replicas,
        local="memory://",
        **extra,
    )
    return ClusterStore("cluster://", namespace, config)


def holders(cluster: ClusterStore, key: int) -> list[int]:
    return [i for i, node in enumerate(cluster.nodes) if node.contains(key)]


# -- placement and reads (in-process nodes) -----------------------------------------------------


def test_item_blocks_go_to_their_shard_and_replicas_user_blocks_everywhere():
    cluster = memory_cluster(replicas=1)
    item = ITEMS[7]
    owner = cluster.config.shard_map.shard_for(item)
    assert cluster.batched_put([(1, kv(5)), (2, kv(3))], placement=[item, None]) == []
    assert holders(cluster, 1) == sorted([owner, (owner + 1) % 4])
    assert holders(cluster, 2) == [0, 1, 2, 3]
    assert cluster.batched_stored([1, 2], placement=[item, None]) == [True, True]


def test_reads_report_their_source_and_skip_a_down_node_for_a_replica():
    spaces = [uuid.uuid4().hex for _ in range(4)]
    writer = memory_cluster(replicas=1, spaces=spaces)
    item = ITEMS[3]
    owner = writer.config.shard_map.shard_for(item)
    writer.batched_put([(9, kv(4))], placement=[item])
    reader = memory_cluster(replicas=1, spaces=spaces)  # a fresh worker: nothing in its local tier
    first = reader.batched_read([9], placement=[item])[0]
    assert same(first.value, kv(4)) and first.source == REMOTE and first.node == reader.node_urls[owner]
    assert reader.batched_read([9], placement=[item])[0].source == LOCAL  # now in the local tier

    other = memory_cluster(replicas=1, spaces=spaces)
    other.nodes[owner].down = True
    read = other.batched_read([9], placement=[item])[0]
    assert same(read.value, kv(4)) and read.node == other.node_urls[(owner + 1) % 4]
    assert other.nodes[owner].stats.errors >= 1


def test_a_key_no_node_can_serve_is_a_fault_or_a_miss_never_an_error():
    cluster = memory_cluster()
    item = ITEMS[0]
    owner = cluster.config.shard_map.shard_for(item)
    assert cluster.batched_read([5], placement=[item])[0].source == MISS
    cluster.batched_put([(5, kv(2))], placement=[item])
    fresh = memory_cluster(spaces=[n.url.removeprefix("memory://") for n in cluster.nodes])
    fresh.nodes[owner].down = True
    assert fresh.batched_read([5], placement=[item])[0].source == FAULT
    fresh.nodes[owner].down = False  # the node is back: used again
    assert same(fresh.batched_read([5], placement=[item])[0].value, kv(2))


def test_a_corrupt_block_on_a_node_is_rejected_and_its_replica_served():
    spaces = [uuid.uuid4().hex for _ in range(4)]
    writer = memory_cluster(replicas=1, spaces=spaces)
    item = ITEMS[11]
    owner = writer.config.shard_map.shard_for(item)
    writer.batched_put([(21, kv(6))], placement=[item])
    writer.nodes[owner].corrupt(21)
    reader = memory_cluster(replicas=1, spaces=spaces)
    read = reader.batched_read([21], placement=[item])[0]
    assert same(read.value, kv(6)) and read.node == reader.node_urls[(owner + 1) % 4]
    assert reader.nodes[owner].stats.errors == 1
    assert reader.stats.errors == 1  # the cluster's own count includes its nodes' faults


def test_writes_some_node_refused_are_reported_and_not_stored_everywhere():
    cluster = memory_cluster(replicas=1)
    cluster.nodes[2].down = True
    failed = cluster.batched_put([(k, kv(2)) for k in range(20)], placement=[None] * 20)
    assert failed == list(range(20))  # replicated blocks belong on node 2 too
    assert cluster.batched_stored([0], placement=[None]) == [False]
    assert cluster.batched_contains([0]) == [True]  # still readable from the other nodes
    cluster.nodes[2].down = False
    assert cluster.batched_put([(0, kv(2))]) == [] and cluster.batched_stored([0]) == [True]


def test_bad_cluster_configurations_raise():
    nodes = [NodeSpec("memory://a"), NodeSpec("memory://b")]
    for bad in (
        dict(nodes=[]),
        dict(nodes=nodes, replicas=2),
        dict(nodes=nodes, home_node=2),
        dict(nodes=[NodeSpec("s3://x")]),
        dict(nodes=[NodeSpec("memory://a"), NodeSpec("memory://a")]),
        dict(nodes=nodes * 2 + [NodeSpec("memory://c")], shard_map=shard_map(4)),
    ):
        with pytest.raises(ConfigError):
            ClusterConfig(**bad)
    with pytest.raises(ConfigError, match="bogus"):
        ClusterConfig.from_dict({"nodes": ["memory://a"], "bogus": 1})
    with pytest.raises(ConfigError, match="NO_SUCH_VARIABLE"):
        NodeSpec("redis://h:1", "u", "NO_SUCH_VARIABLE_RCLLM").store_url()


def test_cluster_file_opens_through_open_store(tmp_path):
    shard_map(2).save(tmp_path / "map.json")
    (tmp_path / "cluster.json").write_text(
        f'{{"nodes": ["memory://{uuid.uuid4().hex}", "memory://{uuid.uuid4().hex}"], '
        '"shard_map": "map.json", "local": "memory://", "replicas": 1}'
    )
    with open_store(f"cluster://{tmp_path}/cluster.json", "ns") as store:
        store.put(3, kv(2))
        assert same(store.get(3), kv(2)) and store.config.shard_map.n_shards == 2


def test_a_node_filled_under_another_shard_map_is_detected(caplog):
    spaces = [uuid.uuid4().hex for _ in range(4)]
    old = memory_cluster(spaces=spaces)
    old.write_manifests()
    assert memory_cluster(spaces=spaces).stale_nodes == []
    config = ClusterConfig(
        [NodeSpec(f"memory://{s}") for s in spaces], replicas=0, local="memory://"
    )  # hash placement
    with caplog.at_level(logging.WARNING, logger="rcllm_sdk.cache"):
        new = ClusterStore("cluster://", "ns", config)
    assert len(new.stale_nodes) == 4 and "re-places them" in caplog.text
    new.write_manifests()
    assert new.stale_nodes == [] and ClusterStore("cluster://", "ns", config).stale_nodes == []
    assert new.nodes[0].get(MANIFEST_KEY) is not None


# -- the engine on a cluster ---------------------------------------------------------------------


def item_prompts(n: int, seed: int = 0):
    """Prompts whose item blocks carry item ids (so the cluster can place them)."""
    rng, prompts = np.random.default_rng(seed), []
    for _ in range(n):
        prompt = make_prompt(rng)
        items = iter(rng.choice(ITEMS, size=5, replace=False).tolist())
        blocks = tuple(replace(b, item_id=next(items)) if b.kind == "item" else b for b in prompt.blocks)
        prompts.append(replace(prompt, blocks=blocks))
    return prompts


def rankings(engine, prompts):
    scored = engine.score(prompts, [LABELS] * len(prompts))
    engine.flush()
    return [s.logits for s in scored], [s.cache for s in scored]


def all_blocks(prompts):
    return [b for p in prompts for b in p.blocks if b.kind in ("system", "user", "item")]


def test_refresh_into_a_cluster_retries_and_reports_refused_writes():
    model, prompts = tiny_model("llama"), item_prompts(4)
    cluster = memory_cluster(replicas=1)
    engine = BlockEngine(
        Ranker(model, None, None, "fp"), cluster, "block_head:2", backend="torch", guard=False
    )
    blocks = all_blocks(prompts)
    cluster.nodes[1].down = True  # writes to node 1 fail: reported, manifests not written
    first = refresh_blocks(engine, blocks, batch_blocks=4, progress=False, retries=1, retry_wait_s=0.01)
    assert first["write_failures"] > 0 and first["manifest_failures"] == []
    assert cluster.nodes[0].get(MANIFEST_KEY) is None
    cluster.nodes[1].down = False
    second = refresh_blocks(engine, blocks, progress=False)  # the re-run finishes only what is missing
    assert second["write_failures"] == 0 and second["computed"] == first["write_failures"]
    assert all(cluster.batched_stored([b.content_hash for b in blocks], [b.item_id for b in blocks]))
    assert cluster.nodes[0].get(MANIFEST_KEY) is not None
    third = refresh_blocks(engine, blocks, progress=False)
    assert third["computed"] == 0


def test_a_refresh_interrupted_half_way_is_finished_by_running_it_again(monkeypatch):
    model, prompts = tiny_model("llama"), item_prompts(4, seed=1)
    cluster = memory_cluster(replicas=1)
    engine = BlockEngine(
        Ranker(model, None, None, "fp"), cluster, backend="torch", guard=False, hot_block_bytes=0
    )
    blocks = all_blocks(prompts)
    real_put, calls = cluster.batched_put, []

    def put_then_stop(items, placement=None):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the operator stops the job between two batches
        calls.append(len(items))
        return real_put(items, placement)

    monkeypatch.setattr(cluster, "batched_put", put_then_stop)
    with pytest.raises(KeyboardInterrupt):
        refresh_blocks(engine, blocks, batch_blocks=3, progress=False)
    monkeypatch.setattr(cluster, "batched_put", real_put)
    unique = list({b.content_hash: b for b in blocks}.values())
    keys, items = [b.content_hash for b in unique], [b.item_id for b in unique]
    done = sum(cluster.batched_stored(keys, items))
    assert (
        done == sum(calls) and cluster.nodes[0].get(MANIFEST_KEY) is None
    )  # no half-written block, no manifest
    rerun = refresh_blocks(engine, blocks, progress=False)
    assert rerun["already_stored"] == done and rerun["write_failures"] == 0
    assert all(cluster.batched_stored(keys, items)) and cluster.nodes[0].get(MANIFEST_KEY) is not None


def test_engine_reports_nodes_touched_remote_bytes_and_local_hits():
    model, prompts = tiny_model("llama"), item_prompts(1, seed=3)
    spaces = [uuid.uuid4().hex for _ in range(4)]
    engine = BlockEngine(
        Ranker(model, None, None, "fp"),
        memory_cluster(spaces=spaces),
        backend="torch",
        guard=False,
        hot_block_bytes=0,
    )
    refresh_blocks(engine, all_blocks(prompts), progress=False)
    reader = BlockEngine(
        Ranker(model, None, None, "fp"),
        memory_cluster(spaces=spaces),
        backend="torch",
        guard=False,
        hot_block_bytes=0,
    )
    _, (cold,) = rankings(reader, prompts)
    _, (warm,) = rankings(reader, prompts)
    shards = {reader.store.nodes_for(b.item_id)[0] for b in prompts[0].blocks if b.kind == "item"}
    assert cold.misses == 0 and cold.local_hits == 0 and cold.remote_bytes == cold.kv_bytes_read
    assert cold.nodes_touched == len(shards | {0})  # the item shards and the home node (system, user)
    assert warm.local_hits == warm.hits and warm.remote_bytes == 0 and warm.nodes_touched == 0


# -- real servers: 3 LMCache servers + 2 Redis servers ------------------------------------------


@pytest.fixture(scope="module")
def servers():
    with ThreadPoolExecutor(5) as pool:
        started = list(pool.map(lambda start: start(), [start_lmcache] * 3 + [start_redis] * 2))
    yield started
    for server in started:
        server.stop()


def server_cluster(servers, namespace: str, replicas: int = 0) -> ClusterStore:
    config = ClusterConfig(
        [NodeSpec(s.url) for s in servers],
        shard_map(len(servers)),
        replicas=replicas,
        local_cpu_gb=0.05,
        node_buffer_gb=0.03,
        timeout_s=1.0,
        retry_s=0.5,
    )
    return ClusterStore("cluster://", namespace, config)


def test_blocks_round_trip_bit_exact_through_lmcache_and_redis_nodes(servers):
    namespace = uuid.uuid4().hex[:16]
    with server_cluster(servers, namespace, replicas=1) as writer:
        values = {k: kv(3 + k, seed=k) for k in range(10)}
        placement = [ITEMS[k] if k % 2 else None for k in range(10)]
        assert writer.batched_put(list(values.items()), placement) == []
    with server_cluster(servers, namespace, replicas=1) as reader:
        reads = reader.batched_read(list(values), placement)
        assert all(
            same(r.value, values[k]) and r.source == REMOTE for k, r in zip(values, reads, strict=False)
        )
        assert {r.node for r in reads} > {reader.node_urls[0]}  # items came from their shards


def test_a_node_killed_mid_stream_changes_no_ranking(servers):
    """Every request is answered, and rankings and scores equal the no-fault run under the
    default policy: a block the dead node held is recomputed, equal to the stored one."""
    model, prompts = tiny_model("llama"), item_prompts(8, seed=5)
    namespace, victim = uuid.uuid4().hex[:16], servers[2]
    with server_cluster(servers, namespace) as store:
        engine = BlockEngine(
            Ranker(model, None, None, "fp"), store, backend="torch", guard=False, hot_block_bytes=0
        )
        refresh_blocks(engine, all_blocks(prompts), progress=False)
        reference, _ = rankings(engine, prompts)
    lost = [b for b in all_blocks(prompts) if b.kind == "item" and store.nodes_for(b.item_id)[0] == 2]
    assert lost, "the test needs blocks on the node it kills"
    with open_store(victim.url, namespace, max_local_cpu_gb=0.03) as direct:
        stored = direct.get(lost[0].content_hash)  # what the dead node held, read before it dies
    with server_cluster(servers, namespace) as store:  # a fresh worker: its local tier is empty
        engine = BlockEngine(
            Ranker(model, None, None, "fp"), store, backend="torch", guard=False, hot_block_bytes=0
        )
        answered, stats = [], []
        for i, prompt in enumerate(prompts):
            if i == 3:
                victim.kill()
            logits, (cache,) = rankings(engine, [prompt])
            answered.extend(logits)
            stats.append(cache)
        assert len(answered) == len(prompts)
        for got, want in zip(answered, reference, strict=False):
            assert torch.equal(got.argsort(descending=True), want.argsort(descending=True))
            assert torch.allclose(got, want, atol=1e-5)
        assert sum(s.misses for s in stats[3:]) > 0 and store.node_stats()[victim.url].errors > 0
        system = prompts[0].blocks[0]
        recomputed = engine.compute(lost[:1], engine.compute([system], None)[system.content_hash])
    view = engine.view
    stored = blockkv.unpack(
        stored,
        lost[0].content_hash,
        len(lost[0].token_ids),
        view.n_layers,
        view.n_kv_heads,
        view.head_dim,
        view.dtype,
    )
    assert stored is not None and torch.allclose(recomputed[lost[0].content_hash], stored, atol=1e-5)


def test_a_slow_node_is_routed_around_then_used_again_when_it_answers(servers):
    namespace = uuid.uuid4().hex[:16]
    with server_cluster(servers, namespace, replicas=1) as writer:
        items = [i for i in ITEMS if writer.nodes_for(i)[0] == 0][:3]
        writer.batched_put([(k, kv(4, seed=k)) for k in range(3)], placement=items)
    slow = servers[0]
    slow.pause()  # answers nothing: every call to it runs into timeout_s (1 s)
    try:
        with server_cluster(servers, namespace, replicas=1) as reader:
            reads = reader.batched_read([0, 1, 2], placement=items)
            assert all(same(r.value, kv(4, seed=k)) for k, r in enumerate(reads))
            assert {r.node for r in reads} == {reader.node_urls[1]}  # the replicas answered
            slow.resume()
            time.sleep(reader.config.retry_s + 0.2)  # the node's back-off ends
            reader.local.close()  # forget the local copies: the next read must go to a node
            reader.local = open_store("memory://", namespace)
            assert reader.batched_read([0], placement=items[:1])[0].node == reader.node_urls[0]
    finally:
        slow.resume()


def test_a_block_corrupted_on_a_redis_node_is_rejected_and_recomputed(servers):
    import redis

    model, prompts = tiny_model("llama"), item_prompts(2, seed=7)
    redis_nodes = servers[3:]
    namespace = uuid.uuid4().hex[:16]
    with server_cluster(redis_nodes, namespace) as store:
        engine = BlockEngine(
            Ranker(model, None, None, "fp"), store, backend="torch", guard=False, hot_block_bytes=0
        )
        refresh_blocks(engine, all_blocks(prompts), progress=False)
        reference, _ = rankings(engine, prompts)
        user = next(b for b in prompts[0].blocks if b.kind == "user")
        name = store.nodes[0]._mgr.key(namespace, user.content_hash).to_string() + "kv_bytes"
    client = redis.Redis(port=redis_nodes[0].port)
    data = bytearray(client.get(name))
    data[200] ^= 0x10
    client.set(name, bytes(data))
    client.close()
    with server_cluster(redis_nodes, namespace) as store:
        store.nodes[1].close()  # only the corrupt copy is reachable
        engine = BlockEngine(
            Ranker(model, None, None, "fp"), store, backend="torch", guard=False, hot_block_bytes=0
        )
        logits, caches = rankings(engine, prompts)
        assert store.node_stats()[redis_nodes[0].url].errors >= 1 and caches[0].misses >= 1
        for got, want in zip(logits, reference, strict=False):
            assert torch.allclose(got, want, atol=1e-5)


def test_redis_password_is_used_and_never_logged(tmp_path, monkeypatch, caplog):
    server = start_redis(password="s3cret-pw")
    port = server.port
    monkeypatch.setenv("RCLLM_TEST_REDIS_PW", "s3cret-pw")
    try:
        spec = NodeSpec(f"redis://127.0.0.1:{port}", "default", "RCLLM_TEST_REDIS_PW")
        config = ClusterConfig([spec], local="memory://", node_buffer_gb=0.03, timeout_s=1.0)
        with caplog.at_level(logging.DEBUG):
            with ClusterStore("cluster://", "pw", config) as store:
                store.put(1, kv(3))
                assert store.nodes[0].stats.errors == 0 and store.nodes[0].stats.puts == 1
                assert "s3cret" not in repr(store.nodes[0]) and "s3cret" not in store.nodes[0].url
        wrong = ClusterConfig(
            [NodeSpec(f"redis://127.0.0.1:{port}")], local="memory://", node_buffer_gb=0.03, timeout_s=1.0
        )
        with ClusterStore("cluster://", "pw", wrong) as store:  # no password: refused, counted
            store.put(2, kv(3))
            assert store.nodes[0].stats.errors >= 1
        assert "s3cret" not in caplog.text
        # LMCache's own loggers (no propagation, their own handlers) carry the redaction filter
        lmcache_loggers = [
            logging.getLogger(n) for n in logging.Logger.manager.loggerDict if n.startswith("lmcache")
        ]
        unfiltered = [lg.name for lg in lmcache_loggers if lg.handlers and not lg.filters]
        assert lmcache_loggers and not unfiltered
    finally:
        server.stop()


def test_lmcache_log_records_lose_their_credentials():
    from rcllm_sdk.cache.lmcache_compat import redact_lmcache_logs

    records = []
    logger = logging.getLogger("lmcache.v1.rcllm_test_probe")
    logger.propagate = False
    logger.setLevel(logging.INFO)  # lmcache's loggers default to LMCACHE_LOG_LEVEL (ERROR here)
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    redact_lmcache_logs()
    logger.info("Creating connector for URL: %s", "rediss://bob:hunter2@cache:6380/0")
    assert records == ["Creating connector for URL: rediss://***@cache:6380/0"]


def test_tls_redis_node_needs_its_ca(tmp_path):
    import subprocess

    from rcllm_sdk.cache.local_servers import Server, _accepts, _wait_ready, free_port

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=rcllm-test-ca",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    )
    (tmp_path / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "1",
        "-extfile",
        "san.cnf",
    )
    port = free_port()
    cmd = [
        "redis-server",
        "--port",
        "0",
        "--tls-port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--tls-cert-file",
        str(tmp_path / "server.crt"),
        "--tls-key-file",
        str(tmp_path / "server.key"),
        "--tls-ca-cert-file",
        str(tmp_path / "ca.crt"),
        "--tls-auth-clients",
        "no",
        "--loglevel",
        "warning",
    ]
    server = _wait_ready(
        Server("redis-server (TLS)", "rediss", port, subprocess.Popen(cmd, stdout=subprocess.DEVNULL)),
        _accepts,
        timeout=15,
    )
    try:

        def cluster(spec):
            return ClusterStore(
                "cluster://",
                "tls",
                ClusterConfig([spec], local="memory://", node_buffer_gb=0.03, timeout_s=2.0),
            )

        with cluster(NodeSpec(f"rediss://127.0.0.1:{port}", ca_certs=str(tmp_path / "ca.crt"))) as store:
            store.put(1, kv(4))
            assert store.nodes[0].stats.errors == 0 and same(store.nodes[0].get(1), kv(4))
        with cluster(NodeSpec(f"rediss://127.0.0.1:{port}")) as store:  # the server's CA is not trusted
            store.put(2, kv(4))
            assert store.nodes[0].stats.errors >= 1 and store.nodes[0].stats.puts == 0
    finally:
        server.stop()
