"""Serve with a block store that other processes share: one worker computes a user's blocks and
writes them back; a second worker, with an empty in-process tier, reads them from the shared store.

    .venv/bin/python examples/serve_shared_store.py --repo feature_repo            # fs:// directory
    .venv/bin/python examples/serve_shared_store.py --repo feature_repo --lmcache  # local LMCache server

In production the store is a directory on shared storage (fs:///abs/dir), an LMCache server
(lm://host:port), Redis (redis://host:port) or a cluster (cluster:///abs/cluster.json); see
docs/kv-store.md.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile

from rcllm_sdk import RcRecommender


@contextlib.contextmanager
def shared_store(use_lmcache: bool):
    """Yield a store URL: a throwaway LMCache server on a free port, or a temporary fs:// folder."""
    if use_lmcache:
        from rcllm_sdk.cache.local_servers import start_lmcache

        server = start_lmcache()  # python -m lmcache.v1.server 127.0.0.1 PORT
        try:
            yield server.url
        finally:
            server.kill()
    else:
        with tempfile.TemporaryDirectory(prefix="rcllm-kv-") as folder:
            yield f"fs://{folder}"  # an absolute path: fs:///tmp/rcllm-kv-...


def serve(repo: str, store: str, users: list[int], worker: str) -> None:
    with RcRecommender.from_feature_store(repo, store=store) as rec:
        for user in users:  # one request at a time, as a serving worker sees them
            r = rec.recommend(user, k=5)
            c = r.cache
            # mode is "full" when the reuse guard judged the prompt too short for reuse to pay
            print(f"{worker} user {r.user_id} ({r.mode}): {r.item_ids} hits {c.hits} misses {c.misses}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", default="feature_repo", help="feature repo trained by `make demo`")
    parser.add_argument("--users", type=int, nargs="+", default=[1, 2, 3], help="user ids to serve")
    parser.add_argument("--lmcache", action="store_true", help="start a local LMCache server (lm://)")
    args = parser.parse_args(argv)
    with shared_store(args.lmcache) as store:
        print("store:", store)
        serve(args.repo, store, args.users, "worker A")  # cold: computes every block, writes it back
        serve(args.repo, store, args.users, "worker B")  # a fresh recommender: hits from the store


if __name__ == "__main__":
    main()
