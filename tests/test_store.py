"""The KV block store: one contract suite over every backend, then persistence, garbled values
and faults (servers started here on free ports; see tests/servers.py)."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from rcllm_sdk.cache import codec, open_store
from rcllm_sdk.cache.base import FAULT, REMOTE
from rcllm_sdk.cache.cluster import ClusterConfig, NodeSpec
from rcllm_sdk.cache.local_servers import free_port, start_lmcache, start_redis
from rcllm_sdk.errors import ConfigError, InvariantError

BACKENDS = ["memory", "local", "fs", "lm", "redis", "cluster"]
SHARED = {"memory", "fs", "lm", "redis", "cluster"}  # a second store on the same location sees the values
OPTS = dict(max_local_cpu_gb=0.03, timeout_s=2.0)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def kv(T: int, dtype=torch.float32, L: int = 2, W: int = 16, seed: int = 0) -> torch.Tensor:
    """[2, L, T, W] of random bit patterns (NaN and inf payloads included): bit-exactness, not values."""
    g = torch.Generator().manual_seed(seed * 1000 + T)
    bits = _BITS[dtype]
    info = torch.iinfo(bits)
    return torch.randint(info.min, info.max, (2, L, T, W), generator=g, dtype=bits).view(dtype)


def same(got, want: torch.Tensor) -> bool:
    return (
        got is not None
        and got.shape == want.shape
        and got.dtype == want.dtype
        and torch.equal(got.view(_BITS[want.dtype]), want.view(_BITS[want.dtype]))
    )


def ns() -> str:
    return uuid.uuid4().hex[:16]


@pytest.fixture(scope="session")
def lm_server():
    server = start_lmcache()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server():
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    """(name, opener): opener(namespace, **options) opens a store on this test's location of the backend."""
    name = request.param
    location = {
        "memory": lambda: f"memory://{uuid.uuid4().hex}",
        "local": lambda: "local://",
        "fs": lambda: f"fs://{tmp_path}/kv",
        "lm": lambda: request.getfixturevalue("lm_server").url,
        "redis": lambda: request.getfixturevalue("redis_server").url,
        "cluster": lambda: "cluster://",
    }[name]()
    spaces = [uuid.uuid4().hex for _ in range(3)]  # the cluster's nodes (replicated keys go to all three)
    opened = []

    def opener(namespace: str, **options):
        if name == "cluster":
            config = ClusterConfig([NodeSpec(f"memory://{s}") for s in spaces], local="memory://")
            store = open_store(location, namespace, config=config)
        else:
            store = open_store(location, namespace, **({} if name == "memory" else {**OPTS, **options}))
        opened.append(store)
        return store

    yield name, opener
    for store in opened:
        store.close()


# -- the contract every backend keeps -----------------------------------------------------------


def test_round_trip_is_bit_exact(backend):
    _, opener = backend
    store = opener(ns())
    blocks = {
        (i * 7919) % 2**64: kv(T, dtype, seed=i)
        for i, (dtype, T) in enumerate((d, t) for d in DTYPES for t in (1, 7, 300))
    }
    blocks[0], blocks[2**64 - 1] = (
        kv(3, L=3, W=24),
        kv(2, torch.bfloat16, L=1, W=8),
    )  # other shapes, edge keys
    for key, value in blocks.items():
        store.put(key, value)
    for key, value in blocks.items():
        assert same(store.get(key), value), (key, value.dtype, value.shape)
    assert store.stats.errors == 0


def test_batched_forms(backend):
    _, opener = backend
    store = opener(ns())
    items = [(10 + i, kv(T, DTYPES[i % 3], seed=i)) for i, T in enumerate((1, 5, 64, 200))]
    store.batched_put(items)
    got = store.batched_get([10, 99, 12, 13])
    assert (
        same(got[0], items[0][1])
        and got[1] is None
        and same(got[2], items[2][1])
        and same(got[3], items[3][1])
    )
    assert store.batched_contains([10, 99, 13]) == [True, False, True]
    assert store.batched_get([]) == [] and store.batched_contains([]) == []


def test_missing_key_and_counters(backend):
    _, opener = backend
    store = opener(ns())
    value = kv(9, torch.float16)
    assert store.get(5) is None and not store.contains(5)
    store.put(5, value)
    assert same(store.get(5), value)
    s = store.stats
    assert (s.puts, s.hits, s.misses, s.errors) == (1, 1, 1, 0)
    assert s.bytes_written == s.bytes_read == value.numel() * 2


def test_contains_and_delete(backend):
    name, opener = backend
    store = opener(ns())
    store.put(1, kv(4))
    assert store.contains(1)
    if not store.can_delete:  # lm://: the LMCache server protocol has no delete
        assert name == "lm" and store.delete(1) is False and same(store.get(1), kv(4))
        return
    assert store.delete(1) is True
    assert not store.contains(1) and store.get(1) is None
    assert store.delete(1) is False


def test_overwrite_last_write_wins(backend):
    name, opener = backend
    namespace = ns()
    store = opener(namespace)
    store.put(3, kv(4, torch.float32))
    store.put(3, kv(11, torch.bfloat16))  # another shape and dtype under the same key
    assert same(store.get(3), kv(11, torch.bfloat16))
    store.batched_put([(4, kv(2)), (4, kv(5))])  # a key repeated in one batch: the last wins
    assert same(store.get(4), kv(5))
    if name in SHARED:
        fresh = opener(namespace)
        assert same(fresh.get(3), kv(11, torch.bfloat16)) and same(fresh.get(4), kv(5))


def test_namespaces_are_isolated(backend):
    name, opener = backend
    a, b = opener(ns()), opener(ns())
    a.put(77, kv(6, seed=1))
    assert b.get(77) is None and not b.contains(77)
    b.put(77, kv(6, seed=2))
    assert same(a.get(77), kv(6, seed=1)) and same(b.get(77), kv(6, seed=2))
    if name in SHARED:
        assert same(opener(a.namespace).get(77), kv(6, seed=1))


def test_threads_share_a_store(backend):
    _, opener = backend
    store = opener(ns())
    failures = []

    def worker(t: int):
        for i in range(12):
            key, value = t * 100 + i, kv(1 + i * 5, DTYPES[(t + i) % 3], seed=t)
            store.put(key, value)
            first = store.batched_get([t * 100])[0]
            if not same(store.get(key), value) or not same(first, kv(1, DTYPES[t % 3], seed=t)):
                failures.append(key)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures and store.stats.errors == 0 and store.stats.puts == 48


def test_bad_keys_and_values_raise(backend):
    _, opener = backend
    store = opener(ns())
    for key in (-1, 2**64, "7", True):
        with pytest.raises(ValueError):
            store.put(key, kv(1))
    with pytest.raises(ValueError):
        store.put(1, torch.zeros(2, 1, 1, 4, dtype=torch.int64))
    with pytest.raises(InvariantError):
        store.put(1, [1.0])


# -- persistence ---------------------------------------------------------------------------------

WRITER = """
import sys, torch
sys.path.insert(0, {root!r})
from tests.test_store import kv
from rcllm_sdk.cache import open_store
store = open_store({url!r}, "persisted", max_local_cpu_gb=0.03)
store.batched_put([(k, kv(T, getattr(torch, d))) for k, T, d in {blocks!r}])
print(store.stats.puts)
# no close(): the process must still exit, and the files must already be written
"""


def test_fs_store_survives_the_process(tmp_path):
    url = f"fs://{tmp_path}/kv"
    blocks = [(1, 1, "float32"), (2**63 + 5, 40, "bfloat16"), (3, 300, "float16")]
    code = WRITER.format(root=str(Path(__file__).parents[1]), url=url, blocks=blocks)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split()[-1] == "3", done.stderr[-2000:]
    with open_store(url, "persisted", max_local_cpu_gb=0.03) as store:
        for key, T, dtype in blocks:
            assert same(store.get(key), kv(T, getattr(torch, dtype))), key
        assert store.get(4) is None
    with open_store(url, "other-model", max_local_cpu_gb=0.03) as store:
        assert store.get(1) is None


# -- garbled values ------------------------------------------------------------------------------


def test_codec_rejects_garbled_blobs():
    value, tag = kv(5, torch.bfloat16), codec.namespace_tag("m")
    blob = codec.encode(9, tag, value)
    assert same(codec.decode(blob, 9, tag), value)
    flipped = blob.clone()
    flipped[-1] ^= 1
    header = blob.clone()
    header[20] ^= 1
    for bad in (flipped, header, blob[:-2], blob[:10], torch.zeros(100, dtype=torch.uint8)):
        assert codec.decode(bad, 9, tag) is None
    assert codec.decode(blob, 8, tag) is None and codec.decode(blob, 9, codec.namespace_tag("n")) is None


def test_garbled_fs_file_reads_as_none(tmp_path, caplog):
    url = f"fs://{tmp_path}"
    with open_store(url, "m", **OPTS) as store:
        store.batched_put([(1, kv(8)), (2, kv(8))])
    files = {int(p.name.split("@")[3], 16): p for p in tmp_path.glob("*.data")}
    data = bytearray(files[1].read_bytes())
    data[-3] ^= 0xFF
    files[1].write_bytes(bytes(data))
    files[2].write_bytes(files[2].read_bytes()[:-10])  # truncated: LMCache's reader says "miss"
    with caplog.at_level(logging.WARNING, logger="rcllm_sdk.cache"), open_store(url, "m", **OPTS) as store:
        assert store.get(1) is None and store.get(1) is None and store.get(2) is None
        assert store.stats.errors == 3 and store.stats.hits == 0 and store.stats.misses == 0
    assert sum("corrupt" in r.getMessage() for r in caplog.records) == 1


def test_a_bad_fs_file_is_one_keys_fault_and_lmcache_logs_no_line_for_it(tmp_path, capfd):
    url = f"fs://{tmp_path}"
    with open_store(url, "m", **OPTS) as store:
        store.batched_put([(k, kv(8)) for k in (1, 2, 3)])
    bad = next(p for p in tmp_path.glob("*.data") if int(p.name.split("@")[3], 16) == 2)
    bad.write_bytes(bad.read_bytes()[:10])
    with open_store(url, "m", **OPTS) as store:
        first = [r.source for r in store.batched_read([2, 1])]
        assert first == [FAULT, REMOTE]
        assert store.get(3) is not None  # the bad file opened no circuit breaker
        store.batched_put([(2, kv(8))])  # recomputed and written back over the bad file
    with open_store(url, "m", **OPTS) as store:
        assert store.get(2) is not None and store.stats.errors == 0
    assert "Failed to read from file" not in capfd.readouterr().err


def test_a_deleted_fs_directory_is_created_again_on_the_next_write(tmp_path):
    import shutil

    folder = tmp_path / "kv"
    with open_store(f"fs://{folder}", "m", **OPTS) as store:
        store.batched_put([(1, kv(8))])
        shutil.rmtree(folder)
        assert store.batched_put([(2, kv(8))]) == []
        assert store.stats.errors == 0
    with open_store(f"fs://{folder}", "m", **OPTS) as store:
        assert store.get(2) is not None


def test_garbled_redis_value_reads_as_none(redis_server):
    import redis

    with open_store(redis_server.url, "m", **OPTS) as store:
        store.put(1, kv(8))
        name = store._mgr.key("m", 1).to_string() + "kv_bytes"  # LMCache's layout: key + "kv_bytes"
    client = redis.Redis(port=redis_server.port)
    data = bytearray(client.get(name))
    data[100] ^= 0x01
    client.set(name, bytes(data))
    client.close()
    with open_store(redis_server.url, "m", **OPTS) as store:
        assert store.get(1) is None and store.stats.errors == 1


# -- faults --------------------------------------------------------------------------------------


@pytest.fixture(params=["lm", "redis"])
def own_server(request):
    server = start_lmcache() if request.param == "lm" else start_redis()
    yield server
    server.kill()


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "rcllm_sdk.cache"]


def test_paused_then_killed_server(own_server, caplog):
    """Stopped: calls time out, are counted, warned once; resumed: the store reconnects; killed:
    calls fail fast. Nothing raises or hangs."""
    caplog.set_level(logging.WARNING, logger="rcllm_sdk.cache")
    with open_store(own_server.url, "m", **OPTS) as other:
        other.put(1, kv(4))
    store = open_store(own_server.url, "m", max_local_cpu_gb=0.03, timeout_s=1.0, retry_s=0.2)
    own_server.pause()
    assert store.get(1) is None and store.batched_get([1, 2]) == [None, None]
    store.put(3, kv(4))
    assert not store.contains(1)
    assert store.stats.errors == 5 and store.stats.puts == 0, store.stats
    assert len(_warnings(caplog)) == 1, _warnings(caplog)
    own_server.resume()
    time.sleep(0.3)  # retry_s
    assert same(store.get(1), kv(4)), (store.stats, _warnings(caplog))  # reconnected
    own_server.kill()
    assert store.get(5) is None
    warned = len(_warnings(caplog))
    for _ in range(5):
        store.put(6, kv(2))
        assert store.get(6) is None and store.batched_get([7, 8]) == [None, None] and not store.contains(6)
        time.sleep(0.05)
    assert store.stats.errors >= 5 + 1 + 5 * 4 and len(_warnings(caplog)) == warned <= 3, _warnings(caplog)
    store.close()
    store.close()
    assert store.get(1) is None


@pytest.mark.parametrize("scheme", ["lm", "redis"])
def test_server_that_is_not_there(scheme, caplog):
    caplog.set_level(logging.WARNING, logger="rcllm_sdk.cache")
    with open_store(
        f"{scheme}://127.0.0.1:{free_port()}", "m", max_local_cpu_gb=0.03, timeout_s=0.5
    ) as store:
        store.put(1, kv(2))
        assert store.get(1) is None and not store.contains(1) and store.batched_get([1, 2]) == [None, None]
        assert store.delete(1) is False
        assert store.stats.errors >= 5 and store.stats.puts == 0
    assert len(_warnings(caplog)) == 1


def test_block_larger_than_the_cpu_tier_is_dropped():
    with open_store("local://", "m", max_local_cpu_gb=0.001) as store:
        store.put(1, kv(20000, L=4))  # 10 MB > 1 MB tier
        store.put(2, kv(3))
        assert store.get(1) is None and same(store.get(2), kv(3)) and store.stats.errors == 1


@pytest.mark.parametrize("server", ["lm_server", "redis_server"])
def test_remote_value_larger_than_the_readers_tier(server, request):
    url, big = request.getfixturevalue(server).url, kv(20000, L=4)  # 10 MB
    with open_store(url, "m", **OPTS) as writer:
        writer.batched_put([(1, big), (2, kv(3))])
    with open_store(url, "m", max_local_cpu_gb=0.005, timeout_s=2.0) as reader:
        assert reader.get(1) is None and reader.stats.errors == 1
        assert same(reader.get(2), kv(3))  # the connection is still in step (lm:// reconnected)


# -- opening -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, namespace, options",
    [
        ("s3://bucket", "m", {}),
        ("fs://relative/dir", "m", {}),
        ("fs:///", "m", {}),
        ("lm://host", "m", {}),
        ("redis://:6379", "m", {}),
        ("local://x", "m", {}),
        ("memory://", "a@b", {}),
        ("memory://", "", {}),
        ("memory://", "m", {"timeout_s": 1}),
        ("local://", "m", {"bogus": 1}),
        ("local://", "m", {"timeout_s": 0}),
    ],
)
def test_bad_urls_and_options(url, namespace, options):
    with pytest.raises(ConfigError):
        open_store(url, namespace, **options)


NO_LMCACHE = """
import sys
import rcllm_sdk.cache
assert "lmcache" not in sys.modules
sys.modules["lmcache"] = None  # as if it were not installed
import torch
from rcllm_sdk.cache import open_store
from rcllm_sdk.errors import ConfigError
with open_store("memory://", "m") as store:
    store.put(1, torch.ones(2, 1, 3, 4))
    assert store.get(1).sum() == 24
try:
    open_store("local://", "m")
except ConfigError as e:
    assert "lmcache" in str(e)
else:
    raise AssertionError("local:// opened without lmcache")
"""


def test_package_works_without_lmcache():
    done = subprocess.run([sys.executable, "-c", NO_LMCACHE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
