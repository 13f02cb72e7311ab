"""The ``rcllm`` command line: ingest, train, recommend, refresh, place, evaluate, bench, bench-storage, demo."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

from .errors import ConfigError, RcLLMError
from .runtime.policies import DEFAULT_POLICY

DEMO_REPO = "feature_repo"


def _synthetic(args):
    from .data.synthetic import SyntheticConfig

    habits = {name: getattr(args, name) for name in ("sequel_habits", "stay_habits") if getattr(args, name)}
    return SyntheticConfig(
        n_users=args.users,
        n_items=args.items,
        seed=args.seed,
        description_words=args.description_words,
        **habits,
    )


def _retriever(text: str | None):
    """``"decay=0.3,w_similarity=0.05"`` -> a RetrieverConfig (unnamed fields keep their defaults)."""
    from dataclasses import fields, replace

    from .retrieval import RetrieverConfig

    config = RetrieverConfig()
    if not text:
        return config
    types = {f.name: type(getattr(config, f.name)) for f in fields(RetrieverConfig)}
    values = {}
    for pair in text.split(","):
        name, _, value = pair.partition("=")
        name = name.strip()
        if name not in types:
            raise argparse.ArgumentTypeError(f"unknown retriever setting {name!r}; known: {', '.join(types)}")
        try:
            values[name] = types[name](value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"retriever setting {name}: expected a {types[name].__name__}, got {value!r}"
            )
    return replace(config, **values)


def _probabilities(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated probabilities such as 0.0,0.3, got {text!r}"
        )


def cmd_ingest(args) -> None:
    from .ingest import ingest

    result = ingest(
        args.source,
        args.path,
        args.repo,
        online_store=args.online_store,
        skip_bad_rows=args.skip_bad_rows,
        synthetic=_synthetic(args),
        retriever_config=args.retriever,
    )
    print(result.summary())


def cmd_train(args) -> None:
    from .pipelines.run import train_from_repo

    result = train_from_repo(args.repo, args.out, _train_config(args))
    s = result["summary"]
    print(
        f"trained {s['parameters']:,}-parameter ranker on {s['examples']:,} examples in {s['train_seconds']:.0f} s "
        f"(loss {s['final_loss']:.3f}); saved to {result['model_dir']}; MLflow model {result['model_uri']}"
    )


def cmd_recommend(args) -> None:
    from .recommender import RcRecommender

    with RcRecommender.from_feature_store(
        args.repo, model=args.model, mode=args.mode, policy=args.policy, store=args.store
    ) as rec:
        for user in args.user:
            r = rec.recommend(user, k=args.k)
            print(
                json.dumps(
                    {
                        "user_id": r.user_id,
                        "item_ids": r.item_ids,
                        "scores": [round(s, 3) for s in r.scores],
                        "ttft_ms": round(r.ttft_ms, 2),
                        "e2e_ms": round(r.e2e_ms, 2),
                        "source": r.source,
                        "mode": r.mode,
                        "cache": asdict(r.cache),
                    }
                )
            )


def cmd_evaluate(args) -> None:
    from .evaluation.evaluate import evaluate

    evaluate(
        args.source,
        args.path,
        args.out,
        model=args.model,
        repo=args.repo,
        train_config=_train_config(args),
        synthetic=_synthetic(args),
        max_users=args.max_users,
        candidates=args.candidates,
        policy=args.policy or DEFAULT_POLICY,
        store=args.store or "local://",
        retriever_config=args.retriever,
    )


def cmd_refresh(args) -> None:
    from .pipelines.refresh import refresh_repo

    figures = refresh_repo(
        args.repo, model=args.model, store=args.store, active_days=args.active_days, force=args.force
    )
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in figures.items()}))


def cmd_place(args) -> None:
    from .pipelines.place import place_repo

    figures = place_repo(args.repo, args.out, shards=args.shards, method=args.method, new=args.new)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}))


def cmd_bench(args) -> None:
    from .evaluation.bench import run_from_args

    run_from_args(args)


def cmd_bench_storage(args) -> None:
    from .evaluation.bench_storage import run_from_args

    run_from_args(args)


def cmd_demo(args) -> None:
    """Small end-to-end run on synthetic data: ingest, train, recommend, evaluate."""
    started = time.perf_counter()
    args.source, args.path = "synthetic", None
    print(f"== ingest synthetic data ({args.users} users, {args.items} items) into {args.repo}/")
    cmd_ingest(args)
    print("== train the ranker")
    args.out = None
    cmd_train(args)
    print("== recommend")
    args.model, args.user, args.k = None, [1, 2, 3], 5
    args.mode = args.policy = args.store = None
    cmd_recommend(args)
    print("== evaluate (leave-one-out on the test split)")
    from .evaluation.evaluate import evaluate

    out = args.eval_out or f"{args.repo}/data/demo_evaluation.json"
    evaluate(
        "synthetic",
        None,
        out,
        model=f"{args.repo}/data/ranker",
        repo=args.repo,
        synthetic=_synthetic(args),
        candidates=20,
        ingest_first=False,
    )
    print(f"demo finished in {time.perf_counter() - started:.0f} s")


def _data_args(p, users: int, items: int) -> None:
    p.add_argument("--source", choices=["synthetic", "movielens", "csv"], default="synthetic")
    p.add_argument(
        "--path",
        help="folder with the source files (movielens: u.data, u.item, u.genre; "
        "csv: interactions.csv[.gz], items.csv)",
    )
    p.add_argument("--users", type=int, default=users, help="synthetic: number of users")
    p.add_argument("--items", type=int, default=items, help="synthetic: number of items")
    p.add_argument("--description-words", type=int, default=24, help="synthetic: words per item description")
    p.add_argument(
        "--sequel-habits",
        type=_probabilities,
        help="synthetic: each user's p_sequel is one of these (comma-separated; default 0.0,0.3)",
    )
    p.add_argument(
        "--stay-habits",
        type=_probabilities,
        help="synthetic: each user's p_stay is one of these (comma-separated; default 0.1,0.7)",
    )
    p.add_argument("--seed", type=int, default=7)
    p.add_argument(
        "--retriever",
        type=_retriever,
        default=_retriever(None),
        metavar="NAME=VALUE,...",
        help="retriever blend settings, e.g. decay=0.3,w_similarity=0.05 (default: RetrieverConfig's; "
        "python -m research.retriever_grid compares settings on validation users)",
    )


def _train_config(args):
    from .pipelines.train import TrainConfig

    try:
        return TrainConfig(
            size=args.size,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            block_aware=args.block_aware,
            block_aware_fraction=args.block_aware_fraction,
            item_text_words=args.item_text_words,
            history_lm_weight=args.history_lm_weight,
            max_examples=args.max_examples,
            recipe=args.recipe,
            item_lm_window=args.item_lm_window,
            item_lm_rank=args.item_lm_rank,
            item_lm_patience=args.item_lm_patience,
            item_features=args.item_features,
            pretrain_worlds=args.pretrain_worlds,
        )
    except ValueError as exc:  # TrainConfig's own validation: a usage error, not a crash
        raise ConfigError(f"{exc} (see rcllm {args.command} --help)") from exc


def _train_args(p, steps: int, size: str = "small", batch_size: int | None = None) -> None:
    p.add_argument("--size", default=size, help="ranker preset: micro, small, base")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument(
        "--batch-size",
        type=int,
        default=batch_size,
        help="prompts (item-lm: history windows) per step (default: verbalizer 32, item-lm 64)",
    )
    p.add_argument("--lr", type=float, help="peak learning rate (default: verbalizer 2e-3, item-lm 3e-3)")
    p.add_argument(
        "--item-text-words",
        type=int,
        default=0,
        help="description words in each item block of the trained template (0: title and category)",
    )
    p.add_argument(
        "--block-aware",
        action="store_true",
        help="train with the block attention structure rcllm serves with (see README)",
    )
    p.add_argument(
        "--block-aware-fraction",
        type=float,
        default=1.0,
        help="with --block-aware: share of training prompts with the block mask, the rest full attention",
    )
    p.add_argument(
        "--history-lm-weight",
        type=float,
        default=0.0,
        help="weight of an auxiliary next-token loss over the history block (item dynamics; see README)",
    )
    p.add_argument(
        "--recipe",
        choices=["verbalizer", "item-lm"],
        default="verbalizer",
        help="verbalizer: train every weight on the label loss; item-lm: train an item-level LM on the "
        "history blocks and compile the label lookup around it (README, Round 8)",
    )
    p.add_argument(
        "--item-lm-window", type=int, default=40, help="item-lm: history items per training window"
    )
    p.add_argument(
        "--item-lm-patience",
        type=int,
        default=3,
        help="item-lm: stop after this many validation checks without improvement, keep the best "
        "weights (0: train every step)",
    )
    p.add_argument(
        "--item-lm-rank",
        type=int,
        default=0,
        help="item-lm: dimensions of the next-item score carried into the label lookup (0: all)",
    )
    p.add_argument(
        "--item-features",
        choices=["id", "content"],
        default="id",
        help="item-lm: id = one learned embedding per item; content = embeddings computed from "
        "categories, series/part in titles and popularity, history lines marked with their "
        "relation to the previous one (README, Round 10)",
    )
    p.add_argument(
        "--pretrain-worlds",
        type=int,
        default=0,
        help="item-lm with --item-features content: also train on this many worlds of the synthetic "
        "generator (seeds 1000, 1001, ...)",
    )
    p.add_argument(
        "--max-examples",
        type=int,
        default=20_000,
        help="training examples drawn (user, position) at random; fewer than steps x batch size "
        "are seen repeatedly, and small models then memorise them (README, Round 7)",
    )


def _serving_args(p) -> None:
    p.add_argument("--policy", help=f"rcllm selection policy (default {DEFAULT_POLICY})")
    p.add_argument("--store", help="block store URL (default local://)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rcllm", description="LLM recommendation with block-structured prompts"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ingest", help="load a source, split it, embed items, fill the Feast repo")
    _data_args(p, 2500, 1200)
    p.add_argument("--repo", default=DEMO_REPO)
    p.add_argument("--online-store", default="sqlite", help="sqlite (default) or redis://host:port")
    p.add_argument(
        "--skip-bad-rows", action="store_true", help="count and skip malformed rows instead of failing"
    )
    p.set_defaults(func=cmd_ingest)
    p = sub.add_parser("train", help="train the ranker on an ingested repo's training split")
    p.add_argument("--repo", default=DEMO_REPO)
    p.add_argument("--out", help="model folder (default <repo>/data/ranker)")
    p.add_argument("--seed", type=int, default=0)
    _train_args(p, 600)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("recommend", help="rank items for users")
    p.add_argument("--repo", default=DEMO_REPO)
    p.add_argument("--model", help="HF folder or MLflow URI (default <repo>/data/ranker)")
    p.add_argument("--user", type=int, nargs="+", required=True)
    p.add_argument("--k", type=int, default=10)
    _serving_args(p)
    p.add_argument("--mode", choices=["rcllm", "prefix", "full"], help="default: config (rcllm)")
    p.set_defaults(func=cmd_recommend)
    p = sub.add_parser("evaluate", help="leave-one-out evaluation of ranker vs retriever")
    _data_args(p, 2500, 1200)
    _train_args(p, 600)
    p.add_argument("--model", help="evaluate this model instead of training one")
    p.add_argument("--repo", help="feature repo to ingest into (default: a temporary folder)")
    p.add_argument("--out", help="write the report JSON here")
    p.add_argument("--max-users", type=int)
    p.add_argument("--candidates", type=int, default=20)
    _serving_args(p)
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("refresh", help="precompute item and active-user block KV into the store")
    p.add_argument("--repo", default=DEMO_REPO)
    p.add_argument("--model", help="HF folder or MLflow URI (default <repo>/data/ranker)")
    p.add_argument(
        "--store",
        default="local://",
        help="fs:///abs/dir, lm://host:port, redis://host:port, cluster:///abs/cluster.json, local://",
    )
    p.add_argument(
        "--active-days", type=float, help="only users active this many days before the newest event"
    )
    p.add_argument("--force", action="store_true", help="recompute blocks that are already stored")
    p.set_defaults(func=cmd_refresh)
    p = sub.add_parser(
        "place", help="shard map of the item blocks: balanced clusters of the Feast item embeddings"
    )
    p.add_argument("--repo", default=DEMO_REPO)
    p.add_argument(
        "--out", required=True, help="shard map JSON (an existing one is updated: new items, re-balance)"
    )
    p.add_argument("--shards", type=int, help="shard count (default 8 for a new map, else the map's own)")
    p.add_argument("--method", choices=["similarity", "hash"], default="similarity")
    p.add_argument("--new", action="store_true", help="build a new map instead of updating the one at --out")
    p.set_defaults(func=cmd_place)
    p = sub.add_parser("bench", help="TTFT of full / prefix / rcllm on the reference and long_item workloads")
    from .evaluation.bench_config import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser(
        "bench-storage", help="nodes touched per request by placement; refresh and TTFT with a node down"
    )
    from .evaluation.bench_storage import add_arguments as add_storage_arguments

    add_storage_arguments(p)
    p.set_defaults(func=cmd_bench_storage)
    p = sub.add_parser("demo", help="ingest synthetic data, train, recommend and evaluate (a few minutes)")
    _data_args(p, 600, 400)
    _train_args(p, 150, size="micro", batch_size=16)
    p.add_argument("--repo", default=DEMO_REPO)
    p.add_argument("--online-store", default="sqlite")
    p.add_argument("--skip-bad-rows", action="store_true")
    p.add_argument("--eval-out", help="report JSON (default <repo>/data/demo_evaluation.json)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except RcLLMError as exc:
        print(f"rcllm: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
