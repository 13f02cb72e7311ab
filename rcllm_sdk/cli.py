"""The ``rcllm`` command line: ingest, train, recommend, refresh, place, evaluate, bench,
bench-storage, demo."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

from .cli_args import (
    DEMO_REPO,
    DEMO_TRAINING,
    _data_args,
    _evaluate_args,
    _model_device_args,
    _repo_args,
    _serving_args,
    _train_args,
    _train_device_args,
    serving_overrides,
)
from .errors import ConfigError, RcLLMError
from .runtime.policies import DEFAULT_POLICY

# Subcommands that live beside the code they run: each module's ``add_commands(sub)`` adds its
# parsers (argparse only at import: `rcllm --help` must not load torch, Feast or MLflow).
COMMAND_MODULES = ("rcllm_sdk.serving.commands", "rcllm_sdk.pipelines.commands")


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


def cmd_ingest(args) -> None:
    from .ingest import ingest

    if getattr(args, "append", False):
        from .ingest_append import append_source

        print(append_source(args.repo, args.source, args.path, args.skip_bad_rows).summary())
        return
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
        f"trained {s['parameters']:,}-parameter {s['recipe']} ranker ({s['choice']}) on "
        f"{s['examples']:,} examples in {s['train_seconds']:.0f} s (loss {s['final_loss']:.3f}); "
        f"saved to {result['model_dir']}; MLflow model {result['model_uri']}"
    )


def cmd_recommend(args) -> None:
    from .recommender import RcRecommender
    from .serving.payload import recommendation_json

    with RcRecommender.from_feature_store(args.repo, model=args.model, **serving_overrides(args)) as rec:
        for user in args.user:
            print(json.dumps(recommendation_json(rec.recommend(user, k=args.k))))


def cmd_evaluate(args) -> None:
    from .evaluation.evaluate import evaluate

    evaluate(_evaluate_config(args))


def _evaluate_config(args, **overrides):
    """``--repo`` without ``--source`` evaluates the repo as ingested; ``--source`` ingests first
    (into ``--repo``, or a temporary folder); neither ingests the synthetic default."""
    from .evaluation.evaluate import EvaluateConfig

    source = args.source
    if source is None and args.repo is None:
        source = "synthetic"
    values = dict(
        source=source,
        path=args.path,
        out=args.out,
        model=args.model,
        repo=args.repo,
        train=_train_config(args) if args.model is None else None,
        synthetic=_synthetic(args),
        retriever=args.retriever,
        max_users=args.max_users,
        timing_samples=args.timing_samples,
        candidates=args.candidates,
        policy=args.policy or DEFAULT_POLICY,
        store=args.store or "local://",
        device=args.device or "cpu",
        dtype=args.dtype or "auto",
    )
    return EvaluateConfig(**{**values, **overrides})


def cmd_refresh(args) -> None:
    from .pipelines.refresh import refresh_repo

    figures = refresh_repo(
        args.repo,
        model=args.model,
        store=args.store,
        active_days=args.active_days,
        force=args.force,
        device=args.device,
        dtype=args.dtype,
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
    """Small end-to-end run on synthetic data: ingest, train, recommend, evaluate (accuracy and
    warm TTFT of full, prefix and rcllm on the same users), then the summary lines."""
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
    print("== evaluate (leave-one-out on the test split; warm TTFT on prompts new to each engine)")
    from .evaluation.evaluate import evaluate
    from .evaluation.report import demo_summary

    args.source, args.max_users = None, None
    out = args.eval_out or f"{args.repo}/data/demo_evaluation.json"
    report = evaluate(_evaluate_config(args, out=out, model=f"{args.repo}/data/ranker"))
    print(f"demo finished in {time.perf_counter() - started:.0f} s; report {out}")
    print(demo_summary(report))


TRAIN_KEYS = (
    "recipe",
    "size",
    "steps",
    "batch_size",
    "lr",
    "seed",
    "item_text_words",
    "max_examples",
    "vocab_size",
    "threads",
    "template",
    "block_aware",
    "block_aware_fraction",
    "history_lm_weight",
    "item_lm_window",
    "item_lm_rank",
    "item_lm_patience",
    "item_features",
    "pretrain_worlds",
    "base_model",
    "lora",
    "full",
    "merge",
    "grad_accum",
    "gradient_checkpointing",
    "resume",
    "checkpoint_every",
    "device",
    "dtype",
)
SWITCHES = ("block_aware", "full", "merge", "gradient_checkpointing", "resume")  # store_true flags


def _train_config(args):
    """The training settings: defaults < ``--train-config`` YAML < ``RCLLM_TRAIN_*`` < flags given."""
    from .pipelines.train_config import TrainConfig

    flags = {key: getattr(args, key, None) for key in TRAIN_KEYS}
    for key in SWITCHES:
        flags[key] = flags[key] or None  # store_true: absent means "not given"
    try:
        return TrainConfig.resolve(getattr(args, "train_config", None), **flags)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (see rcllm {args.command} --help)") from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rcllm", description="LLM recommendation with block-structured prompts"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ingest", help="load a source, split it, embed items, fill the Feast repo")
    _data_args(p, 2500, 1200)
    _repo_args(p)
    p.add_argument(
        "--append", action="store_true", help="add the source's interactions/items to the ingested --repo"
    )
    p.set_defaults(func=cmd_ingest)
    p = sub.add_parser("train", help="train the ranker on an ingested repo's training split")
    p.add_argument("--repo", default=DEMO_REPO, help=f"ingested feature repo (default {DEMO_REPO})")
    p.add_argument("--out", help="model folder (default: a new <repo>/data/models/v<N>, then data/ranker)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    _train_args(p)
    _train_device_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("recommend", help="rank items for users")
    p.add_argument("--repo", default=DEMO_REPO, help=f"ingested feature repo (default {DEMO_REPO})")
    p.add_argument("--model", help="HF folder or MLflow URI (default <repo>/data/ranker)")
    p.add_argument("--user", type=int, nargs="+", required=True, help="user ids to recommend for")
    p.add_argument("--k", type=int, default=10, help="items per user (default 10)")
    _serving_args(p)
    p.add_argument("--mode", choices=["rcllm", "prefix", "full"], help="default: config (rcllm)")
    p.set_defaults(func=cmd_recommend)
    p = sub.add_parser("evaluate", help="leave-one-out evaluation of ranker vs retriever")
    _data_args(p, 2500, 1200, source=None)
    _train_args(p)
    _evaluate_args(p)
    p.add_argument(
        "--repo",
        help="feature repo: with --source, ingest into it (default: a temporary folder); without, "
        "evaluate it as ingested. A ranker trained here is saved to <repo>/data/evaluated_ranker",
    )
    p.add_argument("--out", help="write the report JSON here")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("refresh", help="precompute item and active-user block KV into the store")
    p.add_argument("--repo", default=DEMO_REPO, help=f"ingested feature repo (default {DEMO_REPO})")
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
    _model_device_args(p)
    p.set_defaults(func=cmd_refresh)
    p = sub.add_parser(
        "place", help="shard map of the item blocks: balanced clusters of the Feast item embeddings"
    )
    p.add_argument("--repo", default=DEMO_REPO, help=f"ingested feature repo (default {DEMO_REPO})")
    p.add_argument(
        "--out", required=True, help="shard map JSON (an existing one is updated: new items, re-balance)"
    )
    p.add_argument("--shards", type=int, help="shard count (default 8 for a new map, else the map's own)")
    p.add_argument(
        "--method",
        choices=["similarity", "hash"],
        default="similarity",
        help="similarity (default): balanced clusters of item embeddings; hash: items spread by id",
    )
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
    p = sub.add_parser(
        "demo",
        help="ingest synthetic data, train the content item LM, recommend, evaluate accuracy and warm "
        "TTFT of full / prefix / rcllm (a few minutes on 2 cores)",
        description="The demo trains with --recipe item-lm --size micro --steps 400 --pretrain-worlds 4 "
        "--item-text-words 24 --threads 1 (torch threads of the whole demo process) unless those flags "
        "are given (the defaults listed below are rcllm train's).",
    )
    _data_args(p, 600, 400)
    _train_args(p)
    _evaluate_args(p, timing_samples=100)
    p.set_defaults(**DEMO_TRAINING)
    _repo_args(p)
    p.add_argument("--eval-out", help="report JSON (default <repo>/data/demo_evaluation.json)")
    p.set_defaults(func=cmd_demo)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub)
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
