"""KV block store: per-block KV tensors under 64-bit content-hash keys, one namespace per model.

    >>> from rcllm_sdk.cache import open_store
    >>> store = open_store("redis://127.0.0.1:6379", namespace=model_fingerprint, timeout_s=1.0)
    >>> store.batched_put([(block.content_hash, kv)])     # kv: [2, L, T, W]
    >>> store.batched_get([block.content_hash])           # [tensor] or [None]

URLs:
    memory://[NAME]                  in-process dict (tests); NAME shares one space across stores
    local://                         LMCache CPU tier (StorageManager's LocalCPUBackend), LRU
    fs:///abs/dir                    CPU tier + LMCache fs connector: survives the process
    lm://HOST:PORT                   CPU tier + LMCache server (python -m lmcache.v1.server HOST PORT)
    redis://[USER:PASSWORD@]HOST:PORT  CPU tier + one Redis node (rediss:// for TLS; the password
                                     never appears in logs or in ``store.url``)
    cluster:///abs/cluster.json      item blocks sharded over N lm:// / redis:// nodes, the rest
                                     replicated, one CPU tier in front (see ``cache.cluster``)

Importing this package does not import lmcache; opening an LMCache store does.
"""

from __future__ import annotations

import re
from dataclasses import fields
from urllib.parse import urlsplit

from ..errors import ConfigError
from .base import BlockStore, StoreStats, redact_url

# LMCache splits its remote URLs and fs base paths on commas (several hosts or directories) and
# strips the pieces: a comma or whitespace would silently point it somewhere else.
_PATH_SEPARATORS = (",", " ", "\t", "\n")
_NAMESPACE = re.compile(r"[A-Za-z0-9._-]{1,64}")  # goes into LMCache's key string (no '@', '/', '%')


def open_store(url: str, namespace: str, **options) -> BlockStore:
    """Open the block store at ``url``; keys live under ``namespace`` (the model fingerprint).

    Args:
        url: ``memory://``, ``local://``, ``fs:///abs/dir``, ``lm://host:port`` or ``redis://host:port``.
        namespace: 1-64 characters from ``[A-Za-z0-9._-]``; stores of different namespaces never
            see each other's values, even on one server.
        **options: LMCache stores: ``max_local_cpu_gb`` (0.5), ``timeout_s`` (2.0), ``retry_s`` (5.0);
            any store: ``tier_blocks`` (N > 0: an LRU of N blocks in this process in front of
            the store, which then keeps no CPU copy of its own; ``rcllm_sdk.cache.tiered``).

    Raises:
        ConfigError: unknown scheme or option, malformed URL or namespace.

    Example:
        >>> with open_store("local://", "0123456789abcdef", max_local_cpu_gb=0.1) as store:
        ...     store.put(7, kv)
    """
    if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
        raise ConfigError(f"namespace must be 1-64 characters of [A-Za-z0-9._-], got {namespace!r}")
    tier_blocks = options.pop("tier_blocks", 0)
    if tier_blocks:  # a bounded local tier of its own over the shared store (cache/tiered.py)
        from .tiered import TieredStore

        shared = dict(options, tier_cache=False) if url.lower().startswith(_LMCACHE_REMOTES) else options
        return TieredStore(open_store(url, namespace, **shared), tier_blocks)
    url, parts = _normalised(url)
    if parts.scheme == "memory":
        _reject(options, set(), url)
        from .memory import MemoryStore

        return MemoryStore(url, namespace, space=parts.netloc + parts.path)
    if parts.scheme == "cluster":
        return _open_cluster(url, parts, namespace, options)
    if parts.scheme not in ("local", "fs", "lm", "redis", "rediss"):
        raise ConfigError(
            f"unknown KV store URL {redact_url(url)!r}; use memory://, local://, fs:///abs/dir, "
            "lm://host:port, redis://host:port or cluster:///abs/cluster.json"
        )
    return _open_lmcache(url, parts, namespace, options)


_LMCACHE_REMOTES = ("fs:", "lm:", "redis:", "rediss:")  # stores whose CPU tier copies the remote


def _open_cluster(url, parts, namespace: str, options: dict) -> BlockStore:
    """``cluster:///abs/cluster.json``, or ``cluster://`` with ``config=ClusterConfig(...)``."""
    from .cluster import ClusterConfig, ClusterStore

    _reject(options, {"config"}, url)
    config = options.get("config")
    if config is None:
        if parts.netloc or not parts.path.startswith("/"):
            raise ConfigError(f"cluster store URL must be cluster:///absolute/cluster.json, got {url!r}")
        config = ClusterConfig.from_file(parts.path)
    elif not isinstance(config, ClusterConfig):
        raise ConfigError(f"config must be a ClusterConfig, got {type(config).__name__}")
    return ClusterStore(url, namespace, config)


def _open_lmcache(url, parts, namespace: str, options: dict) -> BlockStore:
    from .lmcache_store import LMCacheOptions, LMCacheStore

    try:
        import lmcache  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"{redact_url(url)!r} is an LMCache store and lmcache is not importable ({e}); "
            "install the package's dependencies (make install) or use memory://"
        ) from e
    _reject(options, {f.name for f in fields(LMCacheOptions)}, url)
    if parts.scheme != "fs" and any(c in url for c in _PATH_SEPARATORS):
        raise ConfigError(
            f"{redact_url(url)!r} holds a comma or whitespace, which LMCache reads as a list of "
            "servers; a password with such characters must be changed"
        )
    opts = LMCacheOptions(**options)
    remote = None
    if parts.scheme == "local" and (parts.netloc or parts.path):
        raise ConfigError(f"a local store URL is just local://, got {url!r}")
    if parts.scheme == "fs":
        if parts.netloc or not parts.path.startswith("/") or parts.path == "/":
            raise ConfigError(f"fs store URL must be fs:///absolute/dir, got {url!r}")
        if any(c in parts.path for c in _PATH_SEPARATORS) or parts.query or parts.fragment:
            raise ConfigError(
                f"fs store directory {parts.path!r} holds a character LMCache reads as a separator "
                f"({' '.join(repr(c) for c in _PATH_SEPARATORS)}, '?', '#'); choose a directory without them"
            )
        remote = _compat().lmcache_url(url, opts.timeout_s)
    elif parts.scheme in ("lm", "redis", "rediss"):
        if not parts.hostname or _port(parts) is None:
            raise ConfigError(
                f"{parts.scheme} store URL must be {parts.scheme}://host:port, got {redact_url(url)!r}"
            )
        remote = _compat().lmcache_url(url, opts.timeout_s)
    return LMCacheStore(url, namespace, remote, opts)


def _normalised(url: str):
    """The URL with its scheme in lower case (``REDIS://`` is ``redis://``), and its parts."""
    if not isinstance(url, str):
        raise ConfigError(f"a KV store URL must be a string, got {type(url).__name__}")
    parts = urlsplit(url)
    if parts.scheme:
        url = parts.scheme + url[len(parts.scheme) :]
    return url, parts


def _port(parts) -> int | None:
    try:
        return parts.port
    except ValueError:
        return None


def _compat():
    from . import lmcache_compat

    return lmcache_compat


def _reject(options: dict, known: set[str], url: str) -> None:
    unknown = set(options) - known
    if unknown:
        raise ConfigError(
            f"unknown option(s) {sorted(unknown)} for {redact_url(url)!r}; known: {sorted(known)}"
        )


__all__ = ["BlockStore", "StoreStats", "open_store"]
