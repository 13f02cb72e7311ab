"""``rcllm`` subcommands of this package (registered by ``rcllm_sdk.cli``; argparse only here):
``rcllm pipeline run`` and ``rcllm schedule``."""

from __future__ import annotations

from rcllm_sdk.cli_args import DEMO_REPO

STEP_NAMES = "retrain,evaluate,promote,refresh,gc"


def add_commands(sub) -> None:
    """Add ``pipeline run`` and ``schedule`` to the ``rcllm`` parser's ``sub``."""
    p = sub.add_parser("pipeline", help="the retrain -> evaluate -> promote -> refresh -> gc chain")
    runs = p.add_subparsers(dest="pipeline_command", required=True)
    run = runs.add_parser("run", help="run the chain once over a feature repo (docs/pipelines.md)")
    _pipeline_args(run)
    run.set_defaults(func=cmd_pipeline_run)
    p = sub.add_parser("schedule", help="run the pipeline chain periodically in this process (APScheduler)")
    _pipeline_args(p)
    p.add_argument("--every", default="1h", help="interval: 90s, 30m, 1h, 1d (default 1h)")
    p.add_argument("--runs", type=int, help="stop after this many runs (default: run until interrupted)")
    p.set_defaults(func=cmd_schedule)


def _pipeline_args(p) -> None:
    p.add_argument("--repo", default=DEMO_REPO, help=f"ingested feature repo (default {DEMO_REPO})")
    p.add_argument("--steps", default=STEP_NAMES, help=f"comma-separated steps (default {STEP_NAMES})")
    p.add_argument(
        "--store", help="serving KV store the refresh fills and gc cleans (default: RCLLM_STORE or local://)"
    )
    p.add_argument("--model-name", help="registered model name (default rcllm-ranker)")
    p.add_argument(
        "--margin",
        type=float,
        default=0.0,
        help="promote only when the challenger's validation NDCG@10 beats the champion's by more (default 0)",
    )
    p.add_argument("--max-users", type=int, help="validation users compared (default: all)")
    p.add_argument("--active-days", type=float, help="refresh only users active this many days")
    p.add_argument(
        "--no-mode-evaluation",
        dest="evaluate_modes",
        action="store_false",
        help="skip the rcllm evaluate run of the challenger (every mode and policy, with figures)",
    )
    p.add_argument(
        "--no-point-in-time",
        dest="point_in_time",
        action="store_false",
        help="retrain on interactions.parquet instead of point-in-time histories from Feast's offline store",
    )
    p.add_argument(
        "--train-config", help="YAML of training settings (rcllm train's flat keys; RCLLM_TRAIN_* also apply)"
    )
    p.add_argument("--train-steps", type=int, help="optimiser steps of the retrain (over --train-config)")


def pipeline_config(args):
    """The :class:`PipelineConfig` the flags describe."""
    from rcllm_sdk.config import RecommenderConfig
    from rcllm_sdk.pipelines.train_config import TrainConfig

    from .pipeline import PipelineConfig

    return PipelineConfig(
        args.repo,
        steps=tuple(s.strip() for s in args.steps.split(",") if s.strip()),
        store=args.store or RecommenderConfig.resolve().store,
        model_name=args.model_name,
        margin=args.margin,
        train=TrainConfig.resolve(args.train_config, steps=args.train_steps),
        max_users=args.max_users,
        active_days=args.active_days,
        point_in_time=args.point_in_time,
        evaluate_modes=args.evaluate_modes,
    )


def cmd_pipeline_run(args) -> None:
    import json

    from .pipeline import run_pipeline

    for step, outcome in run_pipeline(pipeline_config(args)).items():
        print(f"{step}: {outcome['status']} ({outcome['seconds']} s)")
        print(
            json.dumps({k: v for k, v in outcome.items() if k not in ("status", "failed_keys")}, default=str)
        )


def cmd_schedule(args) -> None:
    from .schedule import schedule

    schedule(lambda: pipeline_config(args), args.every, args.runs)
