"""Every script in examples/ runs for real, in its own process, against the session's trained repo,
and prints what its docstring promises.

The session's repo is tiny, so its prompts are short; where a test checks that blocks are reused,
it switches the reuse guard off (``RCLLM_GUARD=false``), which would otherwise serve such prompts by
full prefill."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
USERS = ["1", "2", "3"]
SERVED = re.compile(r"user (\d+) \((\w+)\): \[([\d, ]*)\] hits (\d+) misses (\d+)")


def _run(script: str, *args: str, reuse_always: bool = False) -> str:
    env = dict(os.environ, RCLLM_GUARD="false") if reuse_always else None
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=EXAMPLES.parent,
        env=env,
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    return done.stdout


def _served(out: str, worker: str = "") -> dict[int, tuple[str, list[int], int, int]]:
    """``{user: (mode, item ids, hits, misses)}`` from the lines ``<worker>user U (mode): [...] ...``."""
    rows = {}
    for line in out.splitlines():
        found = SERVED.search(line)
        if found and line.startswith(worker):
            user, mode, ids, hits, misses = found.groups()
            rows[int(user)] = (mode, [int(i) for i in ids.split(",")], int(hits), int(misses))
    return rows


def test_every_example_has_a_test():
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert scripts == ["evaluate.py", "quickstart.py", "refresh.py", "serve_shared_store.py"]


def test_quickstart_prints_a_ranking_and_its_check_against_full_prefill(trained_repo):
    repo, _ = trained_repo
    out = _run("quickstart.py", "--repo", str(repo), "--user", "1", "--k", "4", reuse_always=True)
    items = re.search(r"items: \[([\d, ]+)\] scores: \[([-\d., ]+)\]", out)
    assert items and len(items.group(1).split(",")) == len(items.group(2).split(",")) == 4
    assert re.search(r"mode rcllm, TTFT [\d.]+ ms, recomputed \d+%", out)
    warm = re.search(r"cold TTFT [\d.]+ ms, warm: (\d+) blocks read, (\d+) computed", out)
    assert warm and int(warm.group(1)) > 0 and warm.group(2) == "0"
    assert re.search(r"same ranking as full prefill: (True|False)", out)


def test_a_second_worker_reads_what_the_first_wrote(trained_repo):
    repo, _ = trained_repo
    out = _run("serve_shared_store.py", "--repo", str(repo), "--users", *USERS, reuse_always=True)
    assert re.search(r"store: fs:///\S+", out)
    first, second = _served(out, "worker A"), _served(out, "worker B")
    assert sorted(first) == sorted(second) == [int(u) for u in USERS]
    for user, (mode, items, hits, misses) in second.items():
        _, first_items, first_hits, first_misses = first[user]
        assert mode == "rcllm" and items == first_items  # stored blocks rank as computed ones did
        assert first_misses > 0 and (hits, misses) == (first_hits + first_misses, 0)


def test_refresh_fills_a_store_that_serving_then_finds_complete(trained_repo):
    repo, _ = trained_repo
    out = _run("refresh.py", "--repo", str(repo), "--users", *USERS, reuse_always=True)
    done = re.search(r"refreshed (\d+) of (\d+) blocks", out)
    assert done and int(done.group(1)) == int(done.group(2)) > 0
    assert f"second refresh: computed 0, already stored {done.group(2)}" in out
    served = _served(out)
    assert sorted(served) == [int(u) for u in USERS]
    for mode, items, hits, misses in served.values():
        assert mode == "rcllm" and len(items) == 5 and hits > 0 and misses == 0


def test_evaluate_reports_accuracy_and_agreement(trained_repo, tmp_path):
    repo, _ = trained_repo
    report = tmp_path / "eval.json"
    args = ["--repo", str(repo), "--max-users", "12", "--timing-samples", "2", "--out", str(report)]
    out = _run("evaluate.py", *args)
    assert re.search(r"users: 12\b", out)
    assert re.search(r"ranker - retriever NDCG@10: [+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\]", out)
    agreement = dict(re.findall(r"(\S+) top-1 agreement with full: (\d\.\d{3})", out))
    assert set(agreement) == {"prefix", "rcllm", "control:wrong_history"}
    assert float(agreement["prefix"]) == 1.0  # prefix caching computes the same attention as full
    assert len(re.findall(r"TTFT p50: \d+\.\d+ ms", out)) == 3
    assert report.exists()
