"""``rcllm serve --replicas 2`` on Ray Serve: requests are routed over both replicas, and when one
replica is killed mid-run every request still gets exactly one answer (a 200, or a named error)
and the other replica keeps serving. Needs the `ray` extra (`make test` installs it)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(root: int) -> dict[int, str]:
    """``{pid: command line}`` of every process under ``root``."""
    parents, commands = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in found:
                found[child] = commands[child]
                frontier.append(child)
    return found


@pytest.fixture(scope="module")
def replicated(trained_repo, tmp_path_factory):
    repo, _ = trained_repo
    port = _free_port()
    env = {**os.environ, "RCLLM_THREADS": "1"}
    command = [sys.executable, "-m", "rcllm_sdk.cli", "serve", "--repo", str(repo), "--store", "memory://"]
    command += ["--port", str(port), "--replicas", "2", "--routing", "round_robin"]
    log = tmp_path_factory.mktemp("replicas") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url, log)
        yield proc, url, repo
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the session this fixture started, Ray included


def _wait_ready(proc, url, log, limit_s=300):
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"replicas not ready: {log.read_text()}")


def _users(repo, n):
    import polars as pl

    return pl.read_parquet(repo / "data" / "user_history.parquet")["user_id"].sort().to_list()[:n]


def test_a_killed_replica_costs_no_request_and_the_other_keeps_serving(replicated):
    proc, url, repo = replicated
    users = _users(repo, 40)
    replicas = {
        pid: cmd for pid, cmd in _descendants(proc.pid).items() if "ServeReplica:rcllm-replica" in cmd
    }
    victim = next(pid for pid, cmd in replicas.items() if "rcllm-replica-1" in cmd)

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:

            async def one(i):
                await asyncio.sleep(i / 40)  # 40 requests/s, open loop
                r = await client.post("/v1/recommend", json={"user_id": users[i % 40], "k": 5})
                return r.status_code, r.json()

            calls = [asyncio.ensure_future(one(i)) for i in range(120)]
            await asyncio.sleep(1.0)
            os.kill(victim, signal.SIGKILL)
            return await asyncio.gather(*calls)

    outcomes = asyncio.run(main())
    for status, body in outcomes:
        assert status == 200 and "item_ids" in body or status in (503, 504) and body["error"]["type"]
    assert sum(status == 200 for status, _ in outcomes) > 60
    after = httpx.post(f"{url}/v1/recommend", json={"user_id": users[0], "k": 5}, timeout=120)
    assert after.status_code == 200 and len(after.json()["item_ids"]) == 5
