"""The README quickstart as a script: one user's recommendations from a trained feature repo, and
the same ranking from full prefill (the reference every faster mode is checked against).

    .venv/bin/python examples/quickstart.py --repo feature_repo --user 1
"""

from __future__ import annotations

import argparse

from rcllm_sdk import RcRecommender


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", default="feature_repo", help="feature repo trained by `make demo`")
    parser.add_argument("--user", type=int, default=1, help="user id to recommend for")
    parser.add_argument("--k", type=int, default=5, help="items to return")
    args = parser.parse_args(argv)

    # The default mode: cached block KV, re-positioned, plus the policy's tokens recomputed.
    with RcRecommender.from_feature_store(args.repo) as rec:
        cold = rec.recommend(user_id=args.user, k=args.k)  # computes the blocks, sets up the engine
        r = rec.recommend(user_id=args.user, k=args.k)  # the same request again: its blocks are stored
        print("items:", r.item_ids, "scores:", [round(s, 2) for s in r.scores])
        print(f"mode {r.mode}, TTFT {r.ttft_ms:.1f} ms, recomputed {r.cache.recomputed_fraction:.0%}")
        print(f"cold TTFT {cold.ttft_ms:.1f} ms, warm: {r.cache.hits} blocks read, {r.cache.misses} computed")
        # Same model and features, plain Hugging Face forward over the whole prompt.
        with rec.with_config(mode="full") as full:
            reference = full.recommend(user_id=args.user, k=args.k)
    print("same ranking as full prefill:", reference.item_ids == r.item_ids)


if __name__ == "__main__":
    main()
