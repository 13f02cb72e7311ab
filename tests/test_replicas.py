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
from contextlib import contextmanager
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


@contextmanager
def _serving(repo, log, env, *flags):
    """``rcllm serve --replicas 2 FLAGS`` in its own session; yields ``(proc, url)`` once ready."""
    port = _free_port()
    command = [sys.executable, "-m", "rcllm_sdk.cli", "serve", "--repo", str(repo), "--store", "memory://"]
    command += ["--port", str(port), "--replicas", "2", *flags]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url, log)
        yield proc, url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the session this started, Ray included


@pytest.fixture(scope="module")
def replicated(trained_repo, tmp_path_factory):
    repo, _ = trained_repo
    log = tmp_path_factory.mktemp("replicas") / "serve.log"
    env = {**os.environ, "RCLLM_THREADS": "1"}
    with _serving(repo, log, env, "--routing", "round_robin") as (proc, url):
        yield proc, url, repo


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


@pytest.fixture()
def ray_head(tmp_path):
    """A one-node Ray cluster started as an operator starts it (``ray start --head``, token
    authentication on, with a token of its own); yields the address it prints (Ray advertises
    the node's own IP, never the loopback: it rewrites 127.0.0.1) and the environment a client
    joins with. Stopped with its whole process group afterwards."""
    import secrets

    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    port = _free_port()
    ray = Path(sys.executable).parent / "ray"
    command = [str(ray), "start", "--head", "--block", "--port", str(port), "--num-cpus", "2"]
    command += ["--include-dashboard", "false", "--disable-usage-stats"]
    env = {**os.environ, **auth, "RCLLM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}  # replicas run in it
    log = tmp_path / "ray.log"
    with open(log, "w") as out:
        head = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield _printed_address(head, log), {**os.environ, **auth}
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def _printed_address(head, log, limit_s: float = 180.0) -> str:
    """The ``--address='HOST:PORT'`` that ``ray start`` prints once the head is up."""
    import re

    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        assert head.poll() is None, log.read_text()
        found = re.search(r"--address='([^']+)'", log.read_text())
        if found:
            return found.group(1)
        time.sleep(0.5)
    raise AssertionError(f"the Ray head printed no address: {log.read_text()}")


def test_serve_joins_a_running_ray_cluster_and_reports_replica_batches(trained_repo, ray_head, tmp_path):
    repo, _ = trained_repo
    address, env = ray_head
    with _serving(repo, tmp_path / "serve.log", env, "--routing", "affinity", "--ray-address", address) as (
        _,
        url,
    ):
        users = _users(repo, 6)
        bodies = [{"user_id": u, "k": 5} for u in users]
        batch = httpx.post(f"{url}/v1/recommend:batch", json={"requests": bodies}, timeout=120)
        assert batch.status_code == 200
        assert all(len(r["item_ids"]) == 5 for r in batch.json()["results"])
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        values = dict(line.split() for line in metrics.splitlines() if line.startswith("rcllm_batch_size_"))
        assert float(values["rcllm_batch_size_sum"]) == len(users)  # every request in one counted batch
        assert float(values["rcllm_batch_size_count"]) >= 1


def test_a_killed_replica_costs_no_request_and_the_other_keeps_serving(replicated):
    # runs after the `ray start` test above: its cluster, recorded in /tmp/ray and gone, is not joined
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
