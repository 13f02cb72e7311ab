"""Throwaway storage servers on free 127.0.0.1 ports (tests, `rcllm bench-storage`): redis-server
and LMCache's server, with the faults a test injects (pause, kill)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from ..errors import ServiceStartError


@dataclass
class Server:
    """A server process the tests own: ``url`` to open stores on, and the faults to inject."""

    name: str
    scheme: str
    port: int
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def pause(self) -> None:  # the server stops answering but keeps its sockets
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(timeout=10)

    stop = kill  # nothing of theirs needs a clean shutdown


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(maxmemory: str = "512mb", password: str | None = None) -> Server:
    """A redis-server that evicts least-recently-used keys beyond ``maxmemory`` (what production
    Redis nodes for KV blocks should run with; the lm:// server never evicts)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise ServiceStartError(
            "redis-server is not installed; the store tests need it: "
            "`apt-get install -y redis-server` (or `make install`, which does it)"
        )
    port = free_port()
    cmd = [
        exe,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--loglevel",
        "warning",
        "--maxmemory",
        maxmemory,
        "--maxmemory-policy",
        "allkeys-lru",
    ]
    if password:
        cmd += ["--requirepass", password]
    server = Server("redis-server", "redis", port, subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
    return _wait_ready(server, _accepts if password else _redis_ping, timeout=15)


def start_lmcache() -> Server:
    """``python -m lmcache.v1.server 127.0.0.1 PORT`` (takes a few seconds to import lmcache)."""
    port = free_port()
    env = dict(os.environ, LMCACHE_TRACK_USAGE="false", LMCACHE_LOG_LEVEL="ERROR")
    cmd = [sys.executable, "-m", "lmcache.v1.server", "127.0.0.1", str(port)]
    server = Server("LMCache server", "lm", port, subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL))
    return _wait_ready(server, _accepts, timeout=90)


def _wait_ready(server: Server, probe, timeout: float) -> Server:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise ServiceStartError(
                f"{server.name} exited with code {server.proc.returncode} on port {server.port}"
            )
        if probe(server.port):
            return server
        time.sleep(0.1)
    server.kill()
    raise ServiceStartError(
        f"{server.name} did not accept connections on port {server.port} within {timeout} s"
    )


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False
