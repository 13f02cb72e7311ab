"""Settings of ``rcllm bench`` (no heavy imports: the CLI builds its parser from these)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

DEFAULT_POLICY = "block_head:2"  # keep equal to rcllm_sdk.runtime.policies.DEFAULT_POLICY (tested)
OTHER_POLICIES = ["none", "block_head:4", "block_head:8", "deviation:0.15:1"]


@dataclass(slots=True, frozen=True)
class Workload:
    name: str
    candidates: int
    item_tokens: int  # target length of an item block
    history: int = 50


WORKLOADS = {"reference": Workload("reference", 20, 64), "long_item": Workload("long_item", 50, 128)}

MODELS = {  # random-weight bench models; compute dominates at these sizes
    "cpu-512x8": dict(
        family="llama",
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1408,
    ),
    "qwen-0.5b": dict(
        family="qwen2",
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
    ),
    "qwen-1.5b": dict(
        family="qwen2",
        hidden_size=1536,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=8960,
    ),
    "ranker-small": dict(  # the shape `rcllm train` builds by default (model.ranker.RankerSize)
        family="llama",
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=384,
    ),
    "tiny": dict(
        family="llama",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
    ),
}


@dataclass(slots=True)
class StreamConfig:
    """The request stream; printed and written with the results."""

    items: int = 3000
    zipf_exponent: float = 1.1
    repeat_user_rate: float = 0.5
    history_growth: tuple[int, int] = (1, 3)  # new interactions between two visits, inclusive
    seed: int = 0


@dataclass(slots=True)
class Request:
    user: int
    history: list[int]
    candidates: list[int]


@dataclass(slots=True)
class BenchConfig:
    workloads: list[str] = field(default_factory=lambda: list(WORKLOADS))
    model: str = "cpu-512x8"
    warm_samples: dict = field(default_factory=lambda: {"reference": 30, "long_item": 12})
    cold_samples: dict = field(default_factory=lambda: {"reference": 8, "long_item": 4})
    policy: str = DEFAULT_POLICY
    other_policies: list[str] = field(default_factory=lambda: list(OTHER_POLICIES))
    store: str = "local://"
    device: str = "cpu"
    dtype: str = "auto"
    attention: str = "auto"
    ab_attention: str = ""  # also time the default policy with attention forced to this backend
    threads: int = 0
    guard: bool = True  # the engine's reuse guard (off: rcllm always reuses)
    stream: StreamConfig = field(default_factory=StreamConfig)
    sweep: SweepConfig | None = None  # set: run the size sweep and the profile instead of the workloads


SWEEP_TOKENS = (4, 8, 16, 32, 64, 128)
SWEEP_CANDIDATES = (10, 20, 50)
SWEEP_MODEL = "ranker-small"  # the size rankers are served at; the prompt decides, not the model


@dataclass(slots=True)
class SweepConfig:
    """The size sweep: item-block lengths x candidate counts, warm cache, modes interleaved."""

    tokens: tuple[int, ...] = SWEEP_TOKENS
    candidates: tuple[int, ...] = SWEEP_CANDIDATES
    requests: int = 12  # timed requests per point
    history: int = 10  # items in each user block
    profile_requests: int = 20  # requests in the fixed-cost profile (at the shortest point with K=20)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", default="bench_out/bench.json", help="JSON report (a .md table is written beside it)"
    )
    p.add_argument(
        "--workloads",
        nargs="+",
        default=list(WORKLOADS),
        choices=list(WORKLOADS),
        help="reference: 20 candidates of ~64 tokens; long_item: 50 of ~128",
    )
    p.add_argument(
        "--model",
        default=None,
        choices=list(MODELS),
        help=f"random-weight model (default: cpu-512x8; with --sweep {SWEEP_MODEL}, the served ranker size)",
    )
    p.add_argument(
        "--warm",
        type=int,
        nargs=2,
        metavar=("REFERENCE", "LONG_ITEM"),
        default=(30, 12),
        help="timed warm-cache requests per workload",
    )
    p.add_argument(
        "--cold",
        type=int,
        nargs=2,
        metavar=("REFERENCE", "LONG_ITEM"),
        default=(8, 4),
        help="timed cold-cache requests per workload",
    )
    p.add_argument("--policy", default=DEFAULT_POLICY, help="the rcllm policy the ratios are quoted for")
    p.add_argument(
        "--other-policies",
        nargs="*",
        default=list(OTHER_POLICIES),
        help="more rcllm policies to time beside it",
    )
    p.add_argument("--store", default="local://", help="block store URL shared by prefix and rcllm")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="model dtype (auto: bfloat16 on CUDA, float32 on CPU)",
    )
    p.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "torch", "triton"],
        help="attention backend (auto: Triton on CUDA, torch elsewhere)",
    )
    p.add_argument(
        "--ab-attention",
        default="",
        choices=["", "auto", "torch", "triton"],
        help="also run the default policy with this attention backend, interleaved (an A/B)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the catalog, stream and model")
    p.add_argument(
        "--no-guard",
        action="store_true",
        help="rcllm always reuses (the engine's guard otherwise runs full prefill where reuse cannot pay)",
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help="instead of the workloads: TTFT of full/prefix/rcllm/floor over item-block lengths x "
        "candidates, and a profile of a short prompt's fixed cost",
    )
    p.add_argument(
        "--sweep-tokens", type=int, nargs="+", default=list(SWEEP_TOKENS), help="item-block lengths to sweep"
    )
    p.add_argument(
        "--sweep-candidates", type=int, nargs="+", default=list(SWEEP_CANDIDATES), help="candidate counts"
    )
    p.add_argument("--sweep-requests", type=int, default=12, help="timed requests per sweep point")


def config_from_args(args) -> BenchConfig:
    return BenchConfig(
        workloads=args.workloads,
        model=args.model or (SWEEP_MODEL if args.sweep else "cpu-512x8"),
        warm_samples={"reference": args.warm[0], "long_item": args.warm[1]},
        cold_samples={"reference": args.cold[0], "long_item": args.cold[1]},
        policy=args.policy,
        other_policies=args.other_policies,
        store=args.store,
        device=args.device,
        dtype=args.dtype,
        attention=args.attention,
        ab_attention=args.ab_attention,
        threads=args.threads,
        guard=not args.no_guard,
        stream=StreamConfig(seed=args.seed),
        sweep=SweepConfig(tuple(args.sweep_tokens), tuple(args.sweep_candidates), args.sweep_requests)
        if args.sweep
        else None,
    )
