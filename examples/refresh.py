"""Precompute every item block and the active users' history blocks into a persistent store (what
`rcllm refresh --store URL` does), then serve from it: no block a request needs is missing.

    .venv/bin/python examples/refresh.py --repo feature_repo --store fs:///tmp/rcllm-kv
"""

from __future__ import annotations

import argparse
import tempfile

from rcllm_sdk import RcRecommender
from rcllm_sdk.pipelines.refresh import refresh_repo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", default="feature_repo", help="feature repo trained by `make demo`")
    parser.add_argument(
        "--store", help="fs:///abs/dir, lm://host:port, redis://host:port (default: a temp dir)"
    )
    parser.add_argument("--users", type=int, nargs="+", default=[1, 2, 3], help="user ids to serve")
    args = parser.parse_args(argv)
    store = args.store or f"fs://{tempfile.mkdtemp(prefix='rcllm-kv-')}"

    # 1. Refresh: blocks already in the store are skipped (force=True recomputes them).
    figures = refresh_repo(args.repo, store=store, progress=False)
    print(
        f"refreshed {figures['computed']} of {figures['blocks']} blocks "
        f"({figures['items']} items, {figures['users']} users) into {store} "
        f"in {figures['seconds']:.1f} s, {figures['blocks_per_s']:.0f} blocks/s"
    )
    # 2. Run again: the store persisted, so every block is already there and nothing is computed.
    again = refresh_repo(args.repo, store=store, progress=False)
    print(f"second refresh: computed {again['computed']}, already stored {again['already_stored']}")
    # 3. Serve: a new recommender on the same store finds every block it needs.
    with RcRecommender.from_feature_store(args.repo, store=store) as rec:
        for r in rec.recommend_batch(args.users, k=5):
            print(f"user {r.user_id} ({r.mode}): {r.item_ids} hits {r.cache.hits} misses {r.cache.misses}")


if __name__ == "__main__":
    main()
