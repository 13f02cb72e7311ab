"""``rcllm`` subcommands of this package (registered by ``rcllm_sdk.cli``; argparse only here)."""

from __future__ import annotations

from ..cli_args import DEMO_REPO, _model_device_args, serving_overrides


def add_commands(sub) -> None:
    """Add ``rcllm serve``, ``rcllm bench-load`` and ``rcllm simulate`` to the parser's ``sub``."""
    p = sub.add_parser("serve", help="serve recommendations over HTTP (FastAPI + uvicorn)")
    p.add_argument("--repo", default=DEMO_REPO, help=f"ingested feature repo (default {DEMO_REPO})")
    p.add_argument("--model", help="HF folder or MLflow URI (default <repo>/data/ranker)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--mode", choices=["rcllm", "prefix", "full"], help="default: config (rcllm)")
    p.add_argument("--policy", help="rcllm recompute policy (default: config, block_head:2)")
    p.add_argument("--store", help="block store URL (default: config, local://)")
    _model_device_args(p)
    p.add_argument("--max-batch", type=int, default=8, help="requests per batch (default 8)")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=0.0,
        help="wait this long for a fuller batch (default 0: a batch is what queued while the last ran)",
    )
    p.add_argument(
        "--max-queue", type=int, default=64, help="admitted requests waiting; beyond: HTTP 503 (default 64)"
    )
    p.add_argument(
        "--deadline-ms", type=float, default=30_000.0, help="longest wait in the queue (default 30000)"
    )
    p.add_argument("--api-key-env", metavar="VAR", help="require `Authorization: Bearer $VAR` (not /healthz)")
    p.add_argument(
        "--replicas", type=int, default=1, help="replicas on Ray Serve (default 1: one process, no Ray)"
    )
    p.add_argument(
        "--routing",
        choices=["round_robin", "least_loaded", "affinity"],
        default="affinity",
        help="how requests pick a replica (default affinity)",
    )
    p.add_argument("--ray-address", help="join this Ray cluster (default: start a local one)")
    p.add_argument(
        "--tier-blocks",
        type=int,
        default=4096,
        help="with --replicas: blocks each replica's local tier holds over the shared --store (default 4096)",
    )
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("bench-load", help="open-loop load on rcllm serve: TTFT and throughput per rate")
    from ..evaluation.bench_load import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_bench_load)
    p = sub.add_parser("simulate", help="fit serving costs here, check them on bench-load, project replicas")
    from ..evaluation.simulate import add_arguments as add_simulate_arguments

    add_simulate_arguments(p)
    p.set_defaults(func=cmd_simulate)


def cmd_bench_load(args) -> None:
    from ..evaluation.bench_load import run_from_args

    run_from_args(args)


def cmd_simulate(args) -> None:
    from ..evaluation.simulate import run_from_args

    run_from_args(args)


def cmd_serve(args) -> None:
    import uvicorn

    from ..recommender import RcRecommender
    from .app import ServeSettings, create_app
    from .worker import Worker

    settings = ServeSettings(
        args.max_batch, args.max_wait_ms, args.max_queue, args.deadline_ms, _api_key(args.api_key_env)
    )
    if args.replicas > 1 or args.ray_address:
        app, version = _replicated_app(args, settings)
    else:
        rec = RcRecommender.from_feature_store(args.repo, model=args.model, **serving_overrides(args))
        app, version = create_app(Worker(rec, args.repo), settings), rec.model_version
    print(f"rcllm serve: http://{args.host}:{args.port} (model {version})", flush=True)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        timeout_graceful_shutdown=int(args.deadline_ms / 1000) + 5,
    )


def _replicated_app(args, settings):
    from ..config import RecommenderConfig
    from .app import create_app
    from .replicas import start_replicas

    config = RecommenderConfig.resolve(**serving_overrides(args))
    scheduler, replicas = start_replicas(
        args.repo,
        args.model,
        config,
        settings,
        args.replicas,
        args.routing,
        ray_address=args.ray_address,
        tier_blocks=args.tier_blocks,
    )
    return create_app(replicas, settings, scheduler=scheduler), replicas.model_version


def _api_key(variable: str | None) -> str | None:
    import os

    from ..errors import ConfigError

    if variable is None:
        return None
    key = os.environ.get(variable, "")
    if not key:
        raise ConfigError(f"--api-key-env {variable}: the variable is unset or empty; export the key first")
    return key
