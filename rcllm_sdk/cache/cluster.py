"""Stratified KV storage over N nodes: item blocks on their shard's node (plus ``replicas`` more),
every other block (user histories, the system block, prefix chunks) on every node, and one
process-local CPU tier in front of them all.

    >>> store = open_store("cluster:///etc/rcllm/cluster.json", namespace=model_fingerprint)
    >>> store.batched_read(keys, placement=[item_id_or_None, ...])

``cluster.json`` (paths relative to the file; only ``nodes`` is required)::

    {"nodes": ["lm://10.0.0.1:65432",
               {"url": "rediss://10.0.0.2:6380", "username": "rcllm",
                "password_env": "RCLLM_REDIS_PASSWORD", "ca_certs": "redis-ca.pem"}],
     "shard_map": "shard_map.json",   # absent: hash placement of items over the nodes
     "replicas": 1,                   # extra copies of each item block, on the next nodes
     "home_node": 0,                  # the node beside this worker: replicated blocks read there first
     "local": "local://", "local_cpu_gb": 0.5, "node_buffer_gb": 0.25,
     "timeout_s": 2.0, "retry_s": 5.0}

Shard ``s`` lives on node ``s % N``, its replicas on the nodes after it. Reads go to the local
tier, then, grouped per node and concurrently, to each key's first node; a node that is down,
slow (``timeout_s``) or returns a garbled value is skipped for the key's next node, and a key
no node can serve is a miss (the engine recomputes and writes it back). A node that failed is
skipped for ``retry_s``, then used again. Values are content-addressed and checked on read
(codec header: key, namespace = model fingerprint, shape, dtype, crc), so a node holding
another map's or model's data can only cause misses, never a wrong block.

Each node writes a manifest (the shard map id it was filled under) at the end of
``rcllm refresh``; a node whose manifest names another map is reported in ``stale_nodes`` and
logged, until a refresh re-places its blocks.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import torch

from ..errors import ConfigError, InvariantError
from .base import FAULT, LOCAL, MISS, BlockStore, Read, StoreStats, check_key
from .placement import ShardMap, hash_shard

log = logging.getLogger("rcllm_sdk.cache")

MANIFEST_KEY = 0x5243_4B56_4D41_4E46  # "RCKVMANF": one per node and namespace
NODE_SCHEMES = ("lm", "redis", "rediss", "memory")


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One storage node. Credentials never appear in ``display_url`` (what logs and stats show).

    Attributes:
        url: ``lm://host:port``, ``redis://host:port``, ``rediss://host:port`` (TLS) or
            ``memory://NAME`` (tests). ``lm://`` has no authentication and no TLS: trusted
            networks only.
        username, password_env: Redis ACL user and the environment variable holding its password.
        ca_certs: CA bundle that signed a ``rediss://`` server's certificate.
    """

    url: str
    username: str = ""
    password_env: str = ""
    ca_certs: str = ""

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def display_url(self) -> str:
        parts = urlsplit(self.url)
        host = parts.hostname or parts.netloc
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    def store_url(self) -> str:
        """The URL the node's store opens: credentials and TLS options folded in."""
        if self.scheme not in ("redis", "rediss"):
            return self.url
        parts = urlsplit(self.url)
        netloc = parts.netloc
        if self.password_env:
            password = os.environ.get(self.password_env)
            if password is None:
                raise ConfigError(
                    f"node {self.display_url}: environment variable {self.password_env} "
                    "(its password_env) is not set"
                )
            user = quote(self.username, safe="")
            netloc = f"{user}:{quote(password, safe='')}@{parts.hostname}:{parts.port}"
        query = {"ssl_ca_certs": self.ca_certs, "ssl_cert_reqs": "required"} if self.ca_certs else {}
        return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), ""))


@dataclass(slots=True)
class ClusterConfig:
    """The cluster's topology and options (see the module docstring for the file form)."""

    nodes: list[NodeSpec]
    shard_map: ShardMap | None = None
    replicas: int = 0
    home_node: int = 0
    local: str = "local://"
    local_cpu_gb: float = 0.5
    node_buffer_gb: float = 0.25
    timeout_s: float = 2.0
    retry_s: float = 5.0

    def __post_init__(self):
        n = len(self.nodes)
        if n == 0:
            raise ConfigError("a cluster needs at least one node")
        bad = [s.url for s in self.nodes if s.scheme not in NODE_SCHEMES]
        if bad:
            raise ConfigError(
                f"cluster node URLs must be one of {[s + '://' for s in NODE_SCHEMES]}, got {bad}"
            )
        if len({s.display_url for s in self.nodes}) != n:
            raise ConfigError("cluster nodes must be distinct")
        if not 0 <= self.replicas < n:
            raise ConfigError(f"replicas must be in [0, {n - 1}] for {n} nodes, got {self.replicas}")
        if not 0 <= self.home_node < n:
            raise ConfigError(f"home_node must be a node index in [0, {n - 1}], got {self.home_node}")
        if self.shard_map is not None and self.shard_map.n_shards < n:
            raise ConfigError(
                f"the shard map has {self.shard_map.n_shards} shards for {n} nodes: "
                "some nodes would hold no items; build a map with at least one shard per node"
            )

    @classmethod
    def from_file(cls, path: str | Path) -> ClusterConfig:
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read cluster configuration {path}: {e}") from e
        return cls.from_dict(doc, path.parent)

    @classmethod
    def from_dict(cls, doc: dict, base_dir: str | Path = ".") -> ClusterConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(doc) - known
        if unknown:
            raise ConfigError(f"unknown cluster option(s) {sorted(unknown)}; known: {sorted(known)}")
        doc = dict(doc)
        doc["nodes"] = [
            NodeSpec(n) if isinstance(n, str) else _node(n, Path(base_dir)) for n in doc.get("nodes", [])
        ]
        if isinstance(doc.get("shard_map"), str):
            doc["shard_map"] = ShardMap.load(Path(base_dir) / doc["shard_map"])
        return cls(**doc)


def _node(entry: dict, base_dir: Path) -> NodeSpec:
    try:
        spec = NodeSpec(**entry)
    except TypeError as e:
        raise ConfigError(f"bad cluster node {entry!r}: {e}") from e
    if spec.ca_certs and not Path(spec.ca_certs).is_absolute():
        spec = NodeSpec(spec.url, spec.username, spec.password_env, str(base_dir / spec.ca_certs))
    return spec


class ClusterStore(BlockStore):
    """A ``BlockStore`` over the nodes of a ``ClusterConfig``; safe to share between threads."""

    def __init__(self, url: str, namespace: str, config: ClusterConfig):
        from . import open_store

        super().__init__(url, namespace)
        self.config = config
        local_opts = {} if config.local.startswith("memory://") else {"max_local_cpu_gb": config.local_cpu_gb}
        self.local = open_store(config.local, namespace, **local_opts)
        self.nodes: list[BlockStore] = [self._open_node(spec, open_store) for spec in config.nodes]
        self.node_urls = [spec.display_url for spec in config.nodes]
        self.can_delete = all(node.can_delete for node in self.nodes)
        self._pool = ThreadPoolExecutor(max_workers=len(self.nodes), thread_name_prefix="rcllm-kv-node")
        self.stale_nodes = self._check_manifests()

    def _open_node(self, spec: NodeSpec, open_store) -> BlockStore:
        if spec.scheme == "memory":
            return open_store(spec.url, self.namespace)
        c = self.config
        return open_store(
            spec.store_url(),
            self.namespace,
            max_local_cpu_gb=c.node_buffer_gb,
            timeout_s=c.timeout_s,
            retry_s=c.retry_s,
            tier_cache=False,
        )

    # ---- placement ------------------------------------------------------------------------
    def nodes_for(self, item_id: int | None) -> list[int]:
        """Nodes holding a block, in read-preference order: an item block's shard node and its
        replicas; any other block is on every node, the home node first."""
        n = len(self.nodes)
        if item_id is None:
            home = self.config.home_node
            return [(home + i) % n for i in range(n)]
        shard_map = self.config.shard_map
        shard = shard_map.shard_for(item_id) if shard_map is not None else hash_shard(item_id, n)
        return [(shard + r) % n for r in range(self.config.replicas + 1)]

    def _write_targets(self, item_id: int | None) -> list[int]:
        return list(range(len(self.nodes))) if item_id is None else self.nodes_for(item_id)

    def _per_target_node(self, placement: list[int | None]) -> dict[int, list[int]]:
        """Key indices by node, each key under every node it belongs on."""
        per_node: dict[int, list[int]] = {}
        for i, item in enumerate(placement):
            for node in self._write_targets(item):
                per_node.setdefault(node, []).append(i)
        return per_node

    # ---- the protocol ---------------------------------------------------------------------
    def put(self, key: int, kv: torch.Tensor) -> None:
        self.batched_put([(key, kv)])

    def get(self, key: int) -> torch.Tensor | None:
        return self.batched_read([key])[0].value

    def contains(self, key: int) -> bool:
        return self.batched_contains([key])[0]

    def batched_put(self, items: Sequence[tuple[int, torch.Tensor]], placement=None) -> list[int]:
        """Write each block to all its nodes at once; returns the keys some node did not take
        (a key no node took is not cached locally either)."""
        items = [(check_key(key), kv) for key, kv in items]
        placement = _placement(placement, len(items))
        per_node = self._per_target_node(placement)
        failed_on = self._each_node(per_node, lambda node, idx: node.batched_put([items[i] for i in idx]))
        failed = {key for keys in failed_on.values() for key in keys}
        taken = [
            (key, kv)
            for (key, kv), item in zip(items, placement, strict=False)
            if not all(key in failed_on.get(n, ()) for n in self._write_targets(item))
        ]
        self.local.batched_put(taken)
        self._count(puts=len(taken), bytes_written=sum(kv.numel() * kv.element_size() for _, kv in taken))
        return [key for key, _ in items if key in failed]

    def batched_get(self, keys: Sequence[int], placement=None) -> list[torch.Tensor | None]:
        return [read.value for read in self.batched_read(keys, placement)]

    def batched_read(self, keys: Sequence[int], placement=None) -> list[Read]:
        keys = [check_key(k) for k in keys]
        placement = _placement(placement, len(keys))
        reads: list[Read | None] = [r if r.source == LOCAL else None for r in self.local.batched_read(keys)]
        todo = {i: self.nodes_for(placement[i]) for i, r in enumerate(reads) if r is None}

        def settle(i: int, node: int, read: Read) -> bool:
            if read.source == FAULT and todo[i]:
                return False  # down, slow or garbled: try the key's next node
            reads[i] = Read(read.value, read.source, self.node_urls[node]) if read.value is not None else read
            return True

        self._in_rounds(todo, lambda node, idx: node.batched_read([keys[i] for i in idx]), settle)
        fetched = [
            (k, r.value)
            for k, r in zip(keys, reads, strict=False)
            if r.value is not None and r.source != LOCAL
        ]
        if fetched:
            self.local.batched_put(fetched)
        self._count(
            hits=sum(r.value is not None for r in reads),
            misses=sum(r.source == MISS for r in reads),
            bytes_read=sum(r.nbytes for r in reads),
        )
        return reads

    def batched_contains(self, keys: Sequence[int], placement=None) -> list[bool]:
        """Whether a key can be read: the local tier or one of its nodes holds it."""
        keys = [check_key(k) for k in keys]
        placement = _placement(placement, len(keys))
        found = self.local.batched_contains(keys)
        todo = {i: self.nodes_for(placement[i]) for i, hit in enumerate(found) if not hit}

        def settle(i: int, node: int, hit: bool) -> bool:
            found[i] = hit
            return hit

        self._in_rounds(todo, lambda node, idx: node.batched_contains([keys[i] for i in idx]), settle)
        return found

    def batched_stored(self, keys: Sequence[int], placement=None) -> list[bool]:
        """Whether every node a key belongs on holds it (what ``rcllm refresh`` completes)."""
        keys = [check_key(k) for k in keys]
        placement = _placement(placement, len(keys))
        per_node = self._per_target_node(placement)
        results = self._each_node(per_node, lambda node, idx: node.batched_contains([keys[i] for i in idx]))
        stored = [True] * len(keys)
        for node, idx in per_node.items():
            for i, hit in zip(idx, results[node], strict=False):
                stored[i] = stored[i] and hit
        return stored

    def delete(self, key: int) -> bool:
        check_key(key)
        gone = [node.delete(key) for node in self.nodes]
        return self.local.delete(key) | any(gone)

    @property
    def stats(self) -> StoreStats:
        """The cluster's own counters, with ``errors`` summed over its local tier and every node
        (a node that fails is a fault of the cluster, even when a replica answered)."""
        own = super().stats
        own.errors += sum(store.stats.errors for store in [self.local, *self.nodes])
        return own

    def node_stats(self) -> dict[str, object]:
        """Each node's own counters (``StoreStats``), by node URL (credentials removed)."""
        return {url: node.stats for url, node in zip(self.node_urls, self.nodes, strict=False)}

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for store in [self.local, *self.nodes]:
            store.close()

    # ---- manifests ------------------------------------------------------------------------
    def manifest(self) -> dict:
        shard_map = self.config.shard_map
        return {
            "map_id": shard_map.map_id if shard_map else "hash",
            "version": shard_map.version if shard_map else 0,
            "nodes": self.node_urls,
            "replicas": self.config.replicas,
        }

    def write_manifests(self) -> list[str]:
        """Record on every node that it now holds blocks placed by this map; the nodes that
        could not be written (call it when a refresh has written everything)."""
        blob = torch.frombuffer(bytearray(json.dumps(self.manifest()).encode()), dtype=torch.uint8)
        failed = [
            url
            for url, node in zip(self.node_urls, self.nodes, strict=False)
            if node.batched_put([(MANIFEST_KEY, blob)])
        ]
        self.stale_nodes = [url for url in self.stale_nodes if url in failed]
        return failed

    def _check_manifests(self) -> list[str]:
        ours, stale = self.manifest()["map_id"], []
        found = self._each_node(
            {i: [MANIFEST_KEY] for i in range(len(self.nodes))}, lambda node, keys: node.batched_get(keys)
        )
        for i, url in enumerate(self.node_urls):
            value = found[i][0]
            if value is None:
                continue
            try:
                theirs = json.loads(bytes(value.tolist()).decode()).get("map_id")
            except (ValueError, AttributeError):
                theirs = "unreadable"
            if theirs != ours:
                stale.append(url)
                log.warning(
                    "KV node %s holds blocks placed by shard map %s; this cluster uses %s: reads "
                    "there may miss until `rcllm refresh` re-places them",
                    url,
                    theirs,
                    ours,
                )
        return stale

    # ---- helpers --------------------------------------------------------------------------
    def _in_rounds(self, todo: dict[int, list[int]], ask, settle) -> None:
        """Each round asks every key's next node (``todo``: key index -> nodes left), all nodes
        at once, until ``settle(i, node, answer)`` accepts an answer or the key's nodes run out."""
        while todo:
            per_node: dict[int, list[int]] = {}
            for i, nodes in todo.items():
                per_node.setdefault(nodes.pop(0), []).append(i)
            results = self._each_node(per_node, ask)
            for node, idx in per_node.items():
                for i, answer in zip(idx, results[node], strict=False):
                    if settle(i, node, answer) or not todo[i]:
                        del todo[i]

    def _each_node(self, work: dict[int, list], call) -> dict[int, list]:
        """``call(node_store, batch)`` for every node with work, concurrently; results by node."""
        if len(work) == 1:
            ((node, batch),) = work.items()
            return {node: call(self.nodes[node], batch)}
        futures = {node: self._pool.submit(call, self.nodes[node], batch) for node, batch in work.items()}
        return {node: future.result() for node, future in futures.items()}


def _placement(placement, n: int) -> list[int | None]:
    if placement is None:
        return [None] * n
    placement = list(placement)
    if len(placement) != n:
        raise InvariantError(f"placement has {len(placement)} entries for {n} keys")
    return placement
