"""LMCache 0.5.6 as this package uses it. Every workaround for an LMCache defect lives here,
each marked ``DEFECT:`` with the place in LMCache it works around.

What is used: ``StorageManager`` (its event-loop thread and its CPU tier, ``LocalCPUBackend``,
which also allocates the buffers every connector reads into), ``CacheEngineKey`` and the
remote connectors ``lm://``, ``redis://`` and ``fs://`` from ``CreateConnector``. Remote calls
go to the connector directly, with our own timeouts, because ``RemoteBackend`` waits without
a timeout in ``contains`` and ``close`` (remote_backend.py:181, 622) and turns every error of
``get_blocking`` into a None (remote_backend.py:366-373), hiding the faults we must count.

Nothing from lmcache is imported until a store is opened.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any
from urllib.parse import urlsplit

import torch

from .base import redact_url

os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")  # no usage reports to a remote server
# LMCache logs every failed call; the store logs the first failure of each kind and counts the rest.
os.environ.setdefault("LMCACHE_LOG_LEVEL", "ERROR")

_BLOB_DTYPE = torch.uint8  # connectors move our codec's blobs as uint8 [1, 1, nbytes, 1] tensors:
# KV_2LTD with "tokens" = bytes. A 1-D shape would do for the connectors, but LocalCPUBackend.clear
# calls get_num_tokens(), which indexes dim 2 (memory_management.py:810), and close() then fails.


def lmcache_url(url: str, timeout_s: float) -> str:
    """The URL handed to LMCache for one of ours (``fs:///dir``, ``lm://h:p``, ``redis://h:p``)."""
    parts = urlsplit(url)
    if parts.scheme == "fs":
        # DEFECT: "fs:///dir" (the form CreateConnector's docstring shows) fails the host/port
        # assert in parse_remote_url (connector/__init__.py:67-68); RemoteBackend.init_connection
        # swallows it (remote_backend.py:157-161), so every put is silently dropped. The fs
        # adapter ignores host and port: give it dummy ones.
        return f"fs://localhost:1{parts.path}"
    if parts.scheme in ("redis", "rediss"):
        # redis-py waits forever on a server that stops answering unless told otherwise.
        sep = "&" if parts.query else "?"
        return f"{url}{sep}socket_timeout={timeout_s}&socket_connect_timeout={timeout_s}"
    return url


def call_in_daemon_thread(fn: Callable[[], Any], timeout: float | None = None) -> Any:
    """Run ``fn`` in a fresh daemon thread; its result, its exception, or TimeoutError.

    Threads inherit daemon-ness from their creator: LMCache objects built here start daemon
    threads, so an unclosed store can never keep the process alive.
    """
    box: dict[str, Any] = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            box["error"] = e

    thread = threading.Thread(target=target, name="rcllm-cache-call", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"{getattr(fn, '__name__', 'call')} did not finish within {timeout} s")
    if "error" in box:
        raise box["error"]
    return box["result"]


def fault_kind(exc: BaseException) -> str | None:
    """``timeout`` or ``unreachable`` for a failure of the link (down, refused, reset, silent);
    None for a failure of one value."""
    import redis.exceptions

    if isinstance(exc, (TimeoutError, FutureTimeout, asyncio.TimeoutError, redis.exceptions.TimeoutError)):
        return "timeout"
    # struct.error: LMCServerConnector unpacks a reply header that a closed socket cut short.
    if isinstance(exc, (OSError, EOFError, struct.error, redis.exceptions.ConnectionError)):
        return "unreachable"
    return None


def blob(obj) -> torch.Tensor:
    """The bytes of a memory object as the codec's 1-D uint8 tensor (a view)."""
    return obj.tensor.view(-1)


def release(objs: Sequence[Any]) -> None:
    """Drop our reference to the LMCache memory objects among ``objs`` (other items are skipped)."""
    for obj in objs:
        if hasattr(obj, "ref_count_down"):
            obj.ref_count_down()


class Manager:
    """One ``StorageManager`` with only its CPU tier; remote connectors attach to its loop."""

    def __init__(self, max_local_cpu_gb: float):
        from lmcache.v1.config import LMCacheEngineConfig
        from lmcache.v1.event_manager import EventManager
        from lmcache.v1.metadata import LMCacheMetadata
        from lmcache.v1.storage_backend.storage_manager import StorageManager

        self.config = LMCacheEngineConfig.from_defaults(
            local_cpu=True, max_local_cpu_size=max_local_cpu_gb, remote_url=None, remote_serde="naive"
        )
        # Shape/dtype here only size LMCache's "full chunk"; values carry their own (codec header).
        self.metadata = LMCacheMetadata(
            model_name="rcllm_sdk",
            world_size=1,
            local_world_size=1,
            worker_id=0,
            local_worker_id=0,
            kv_dtype=_BLOB_DTYPE,
            kv_shape=(1, 2, 256, 1, 1),
        )
        # DEFECT: the StorageManager's event-loop thread is not a daemon (storage_manager.py:238-243):
        # a process that forgets close(), or fails before it, never exits. Built in a daemon thread,
        # the loop thread inherits daemon=True.
        self.sm = call_in_daemon_thread(lambda: StorageManager(self.config, self.metadata, EventManager()))
        self.local = self.sm.storage_backends["LocalCPUBackend"]
        self.loop = self.sm.loop
        self.capacity = int(max_local_cpu_gb * 1024**3)

    def key(self, namespace: str, chunk_hash: int):
        """LMCache's key: namespace as model_name; chunk_hash kept unsigned (it is written with
        ``:x`` and read with ``int(s, 16)``, utils.py:579 and 524, so any int round-trips)."""
        from lmcache.utils import CacheEngineKey

        return CacheEngineKey(namespace, 1, 0, chunk_hash, _BLOB_DTYPE)

    def allocate(self, nbytes: int):
        """A ``[1, 1, nbytes, 1]`` uint8 buffer from the CPU tier (evicting LRU entries), or None."""
        from lmcache.v1.memory_management import MemoryFormat

        return self.allocate_shape(torch.Size([1, 1, nbytes, 1]), _BLOB_DTYPE, MemoryFormat.KV_2LTD)

    def allocate_shape(self, shapes, dtypes, fmt=None):
        # DEFECT: LocalCPUBackend.allocate with busy_loop=True (the default, and what every
        # connector uses for its read buffers) sleeps and retries forever, on the event loop,
        # when nothing can be evicted (local_cpu_backend.py:716-732); and a blob larger than
        # the tier evicts every entry before failing. Never wait; refuse what cannot fit.
        pairs = zip(shapes, dtypes, strict=False) if isinstance(shapes, list) else [(shapes, dtypes)]
        if sum(torch.Size(s).numel() * d.itemsize for s, d in pairs) > self.capacity:
            return None
        return self.local.allocate(shapes, dtypes, fmt, eviction=True, busy_loop=False)

    def tier_put(self, key, obj) -> None:
        # LocalCPUBackend.submit_put_task ignores a key it holds (local_cpu_backend.py:163-164):
        # remove first so that the last write wins.
        self.local.remove(key)
        self.local.submit_put_task(key, obj)

    def tier_get(self, key):
        return self.local.get_blocking(key)  # ref-counted for the caller

    def tier_contains(self, key) -> bool:
        return self.local.contains(key)

    def tier_remove(self, key) -> bool:
        return self.local.remove(key)

    def run(self, coro: Awaitable, timeout: float) -> Any:
        """Run ``coro`` on the manager's loop; TimeoutError after ``timeout`` seconds (the call
        then finishes in the background and memory objects it returns are released)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.add_done_callback(_release_late_result)
            raise TimeoutError(f"no answer within {timeout} s") from None

    def close(self, timeout: float) -> None:
        call_in_daemon_thread(self.sm.close, timeout)


class _RedactCredentials(logging.Filter):
    """Redacts credentials; drops the fs connector's ERROR line per unreadable file (the store
    counts each as a ``corrupt value`` fault and warns once, see :class:`UnreadableValue`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Failed to read from file"):
            return False
        redacted = redact_url(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


_REDACT = _RedactCredentials()


def redact_lmcache_logs() -> None:
    """DEFECT: LMCache logs the remote URL, credentials included, at INFO (connector/__init__.py:
    57 and 351, "Creating connector for URL: ..."). Its loggers do not propagate and each has its
    own handler (lmcache/logging.py:66-80), so the filter goes on every lmcache logger: those
    that exist, and (through its ``init_logger``) those that modules imported later create."""
    import lmcache.logging as lmcache_logging

    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if (
            name.startswith("lmcache")
            and isinstance(logger, logging.Logger)
            and _REDACT not in logger.filters
        ):
            logger.addFilter(_REDACT)
    make = lmcache_logging.init_logger
    if not getattr(make, "redacts", False):

        def init_logger(name: str):
            logger = make(name)
            logger.addFilter(_REDACT)
            return logger

        init_logger.redacts = True
        lmcache_logging.init_logger = init_logger


class UnreadableValue(Exception):
    """An fs:// file that exists but could not be read (truncated, garbled, unreadable)."""


class TierFull(Exception):
    """A value read from a remote does not fit in the CPU tier."""


class _TierForConnectors:
    """What connectors get as their ``local_cpu_backend``: the tier, allocating without waiting.

    DEFECT: a refusal must raise, not return None: LMCServerConnector.receive_all returns None
    without reading the payload off the socket (lm_connector.py:67-70), which would leave the
    stream out of step while looking like a plain miss.
    """

    def __init__(self, manager: Manager):
        self._manager, self._local = manager, manager.local

    def allocate(self, shapes, dtypes, fmt=None, *args, **kwargs):
        obj = self._manager.allocate_shape(shapes, dtypes, fmt)
        if obj is None:
            raise TierFull(f"a remote value of shape {shapes} does not fit in the CPU tier")
        return obj

    def __getattr__(self, name: str):
        return getattr(self._local, name)


def _release_late_result(future) -> None:
    if not future.cancelled() and future.exception() is None and isinstance(future.result(), list):
        release(future.result())


class Remote:
    """One LMCache remote connector (``lm://``, ``redis://`` or ``fs://``) with timeouts,
    per-key results and reconnection. Methods return, per key, a value or the exception
    that key's call raised; only a whole call that overruns its timeout raises."""

    def __init__(self, manager: Manager, url: str, timeout_s: float):
        self.manager, self.url, self.timeout_s = manager, url, timeout_s
        self.scheme = {"rediss": "redis"}.get(urlsplit(url).scheme, urlsplit(url).scheme)
        self.can_delete = self.scheme != "lm"  # the lm:// protocol has PUT/GET/EXIST only
        # A directory has no link to lose: one file's failure must not stop the others' reads.
        self.link_faults = self.scheme != "fs"
        # DEFECT: LMCServerConnector.get reads a reply's header and its payload under two separate
        # acquisitions of its lock (lm_connector.py:145-164), so two gets in flight on one socket
        # can read each other's bytes. All lm:// calls of a store run one at a time, whole.
        self._serial = self.scheme == "lm"
        self._lock = asyncio.Lock()
        self._connect_lock = threading.Lock()
        self._conn = None

    def connect(self) -> None:
        """Create the connector if there is none (or the last one broke); raises on failure."""
        with self._connect_lock:
            if self._conn is None:
                self._conn = self._create()

    def _create(self):
        from lmcache.v1.storage_backend.connector import CreateConnector

        m, tier = self.manager, _TierForConnectors(self.manager)
        redact_lmcache_logs()
        conn = call_in_daemon_thread(  # lm:// connects a blocking socket with no timeout
            lambda: CreateConnector(self.url, m.loop, tier, m.config, m.metadata), self.timeout_s
        )
        if self._serial:
            # DEFECT: LMCServerConnector does blocking sendall/recv on the event loop with no
            # timeout (lm_connector.py:86-99, 145-157): a server that stops answering would
            # freeze the loop, and every store call after it, for good.
            conn._connector.client_socket.settimeout(self.timeout_s)
        return conn

    def broken(self) -> None:
        """Forget the connector after a failed call; the next connect() makes a new one.

        DEFECT: LMCServerConnector never reconnects, and after an error its byte stream may be
        out of step with the server's replies. Redis pools and fs reconnect on their own.
        """
        if self._serial and self._conn is not None:
            self._conn._connector.client_socket.close()
            self._conn = None

    def get_many(self, keys: Sequence) -> list:
        got = self._each(keys, lambda conn, key: conn.get(key))
        if self.scheme != "fs":
            return got
        # The fs connector reads a bad file as a miss: ask which misses have a file after all.
        missed = [i for i, value in enumerate(got) if value is None]
        present = self.exists_many([keys[i] for i in missed]) if missed else []
        for i, found in zip(missed, present, strict=True):
            if found is True:
                got[i] = UnreadableValue(f"{self._fs_dir()}: the file of a stored block could not be read")
        return got

    def exists_many(self, keys: Sequence) -> list:
        return self._each(keys, lambda conn, key: conn.exists(key))

    def put_many(self, keys: Sequence, objs: Sequence) -> list:
        if self.scheme == "fs":
            os.makedirs(self._fs_dir(), exist_ok=True)  # recreated if someone deleted it

        async def put(conn, pair):
            pair[1].ref_count_up()  # the connector's put consumes one reference
            await conn.put(*pair)
            return True

        results = self._each(list(zip(keys, objs, strict=False)), put)
        if self._serial and keys and results[-1] is True:
            # DEFECT: an lm:// PUT gets no reply (lm_connector.py:110-135): "sent" is not "stored",
            # even with the server stopped. The server serves a connection in order, so an answered
            # EXIST of the last key proves the whole batch is stored.
            stored = self._each([keys[-1]], lambda conn, key: conn.exists(key))[0]
            if stored is not True:
                error = stored if isinstance(stored, BaseException) else ConnectionError("PUT not stored")
                results = [error] * len(keys)
        return results

    def _fs_dir(self) -> str:
        return urlsplit(self.url).path

    def remove(self, key) -> bool:
        if self.scheme == "redis":
            # DEFECT: RedisConnector has no remove_sync (the base raises NotImplementedError,
            # base_connector.py:352-360): delete its two entries with its own client.
            redis = self._conn._connector.connection
            k = key.to_string()
            return bool(self.manager.run(redis.delete(k + "kv_bytes", k + "metadata"), self.timeout_s))
        if self.scheme == "fs":  # remove_sync logs an error for a missing file: ask first
            fs = self._conn._connector
            return fs.exists_sync(key) and fs.remove_sync(key)
        return False

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self.scheme == "redis":
            # DEFECT: RedisConnector.close deadlocks: it awaits pq_executor.shutdown(), which blocks
            # the loop thread on a future that loop must complete (redis_connector.py:391-393,
            # pq_executor.py:124-130). Shut the executor down the async way, close the client.
            async def close_redis(real=conn._connector):
                await real.pq_executor.shutdown_async(wait=False)
                await real.connection.aclose()

            self.manager.run(close_redis(), self.timeout_s)
        elif self._serial:
            conn._connector.client_socket.close()
        else:
            self.manager.run(conn.close(), self.timeout_s)

    def _each(self, items: Sequence, call: Callable) -> list:
        """``call(conn, item)`` for every item: in one coroutine, concurrently where the connector
        allows it; for lm:// in order, stopping at the first error."""
        conn = self._conn
        if conn is None:
            raise ConnectionError(f"{self.url}: not connected")

        async def serial():
            out: list = []
            async with self._lock:
                for item in items:
                    try:
                        out.append(await call(conn, item))
                    except Exception as e:  # noqa: BLE001 - returned per item
                        return out + [e] * (len(items) - len(out))  # the stream may be out of step
            return out

        async def concurrent():
            return await asyncio.gather(*(call(conn, item) for item in items), return_exceptions=True)

        return self.manager.run(serial() if self._serial else concurrent(), self.timeout_s)
