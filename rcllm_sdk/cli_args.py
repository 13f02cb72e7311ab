"""Argument groups of the ``rcllm`` subcommands (data, training, evaluation, serving). No torch:
building the parser and ``--help`` import nothing heavy."""

from __future__ import annotations

import argparse

from .runtime.policies import DEFAULT_POLICY

DEMO_REPO = "feature_repo"


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
        except ValueError as exc:
            raise argparse.ArgumentTypeError(
                f"retriever setting {name}: expected a {types[name].__name__}, got {value!r}"
            ) from exc
    return replace(config, **values)


def _probabilities(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated probabilities such as 0.0,0.3, got {text!r}"
        ) from exc


def _data_args(p, users: int, items: int, source: str | None = "synthetic") -> None:
    p.add_argument(
        "--source",
        choices=["synthetic", "movielens", "csv"],
        default=source,
        help=f"data to ingest (default {source or 'synthetic, or none with --repo'})",
    )
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
    p.add_argument(
        "--seed", type=int, default=7, help="synthetic data (and evaluate's training) seed (default 7)"
    )
    p.add_argument(
        "--retriever",
        type=_retriever,
        default=_retriever(None),
        metavar="NAME=VALUE,...",
        help="retriever blend settings, e.g. decay=0.3,w_similarity=0.05 (default: RetrieverConfig's; "
        "python -m research.retriever_grid compares settings on validation users)",
    )


RECIPE_HELP = (
    "item-lm (default): an item-level LM over the history blocks with the label lookup compiled around "
    "it; the ranker reads each user's history (use it). verbalizer: every weight trained on the label "
    "loss; at CPU budgets it ranks nearly alike for every user (use it only to compare). "
    "--base-model selects a third, finetune: a pretrained LLM trained on the label loss (use it on a GPU "
    "to serve your own Llama/Qwen/Mistral checkpoint; item-lm stays the CPU default)"
)
FEATURES_HELP = (
    "item-lm: id = one learned embedding per item (use on catalogs with many interactions per item, "
    "e.g. MovieLens-1M); content = embeddings computed from categories, series/part in titles and "
    "popularity, history lines marked with their relation to the previous one (use on sparse "
    "catalogs); auto (default): id when the training split has >= 100 interactions per item, "
    "else content; the choice is printed and saved in the training record"
)


def _train_args(p, demo: bool = False) -> None:
    """Training flags; every default None is the recipe's (see rcllm_sdk.pipelines.train_config)."""
    p.add_argument("--train-config", help="YAML file of training settings (flat keys, e.g. steps: 600)")
    p.add_argument("--recipe", choices=["item-lm", "verbalizer"], help=RECIPE_HELP)
    p.add_argument(
        "--size",
        choices=["micro", "small", "base"],
        help="model size preset (default: verbalizer small; item-lm id small, content micro)",
    )
    p.add_argument(
        "--steps", type=int, help="optimiser steps (default: verbalizer 600; item-lm id 2000, content 2000)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help="prompts (item-lm: history windows) per step (default: verbalizer 32, item-lm 64)",
    )
    p.add_argument("--lr", type=float, help="peak learning rate (default: verbalizer 2e-3, item-lm 3e-3)")
    p.add_argument(
        "--vocab-size", type=int, help="BPE vocabulary size of the trained tokenizer (default 4000)"
    )
    p.add_argument("--threads", type=int, help="torch CPU threads for training (default: torch's)")
    p.add_argument(
        "--item-text-words",
        type=int,
        help="description words in each candidate's item block "
        "(default 0: the item alone); more text makes block reuse pay more",
    )
    p.add_argument(
        "--template",
        metavar="YAML",
        help="prompt template file (item fields, history length, instruction, label format, BOS, chat "
        "template: docs/configuration.md); verbalizer and --base-model only, replaces --item-text-words; "
        "saved with the model and served as trained",
    )
    p.add_argument(
        "--max-examples",
        type=int,
        help="training examples drawn (user, position) at random "
        "(default 20000); fewer than steps x batch size are seen repeatedly",
    )
    p.add_argument("--item-features", choices=["auto", "id", "content"], help=FEATURES_HELP)
    p.add_argument(
        "--pretrain-worlds",
        type=int,
        help="item-lm, content features: also train on this many "
        "worlds of the synthetic generator, seeds 1000, 1001, ... (default 8; 0: none)",
    )
    p.add_argument(
        "--item-lm-window", type=int, help="item-lm: history items per training window (default 40)"
    )
    p.add_argument(
        "--item-lm-patience",
        type=int,
        help="item-lm: stop after this many validation checks "
        "without improvement and keep the best weights (default: 3; 0 with pretraining worlds, "
        "whose noisy validation would stop too early; 0: train every step)",
    )
    p.add_argument(
        "--item-lm-rank",
        type=int,
        help="item-lm: dimensions of the next-item score carried into the label lookup (default 0: all)",
    )
    p.add_argument(
        "--block-aware",
        action="store_true",
        help="verbalizer, finetune: train with the block attention "
        "structure rcllm serves with (user and item blocks see the system block and themselves)",
    )
    p.add_argument(
        "--block-aware-fraction",
        type=float,
        help="verbalizer or finetune with --block-aware: share of "
        "training prompts with the block mask, the rest full attention (default 1.0)",
    )
    p.add_argument(
        "--history-lm-weight",
        type=float,
        help="verbalizer: weight of an auxiliary next-token loss over the history block (default 0)",
    )
    _finetune_args(p)


def _finetune_args(p) -> None:
    """The finetune recipe's flags (``--base-model`` selects it)."""
    p.add_argument(
        "--base-model",
        metavar="PATH_OR_URI",
        help="fine-tune this pretrained checkpoint (a Hugging Face folder or an MLflow model URI) "
        "instead of building a ranker from scratch: selects the finetune recipe (see docs/training.md)",
    )
    p.add_argument(
        "--lora",
        metavar="R,ALPHA,DROPOUT",
        help="finetune: LoRA adapters of this rank, alpha and dropout on the attention and MLP "
        "projections (default 8,16,0.05); the output is an adapter folder over --base-model",
    )
    p.add_argument(
        "--full", action="store_true", help="finetune: train every weight instead of LoRA adapters"
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="finetune with LoRA: write a plain Hugging Face folder with the adapters merged in",
    )
    p.add_argument(
        "--grad-accum",
        type=int,
        help="finetune: micro-batches of --batch-size per optimiser step (default 1)",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="finetune: recompute layer activations in the backward pass (less memory, ~30%% slower)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="finetune: continue from the checkpoint in --out (written every --checkpoint-every steps)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        help="finetune: steps between resumable checkpoints in <out>/checkpoint (default 50; 0: none)",
    )


def _train_device_args(p) -> None:
    """Where ``rcllm train`` trains (the finetune recipe; the others train on the CPU)."""
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        help="finetune: where to train (default auto: CUDA when available, else CPU)",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="finetune: autocast dtype on CUDA (default auto: bfloat16 where supported); CPU: float32",
    )


# The demo's training: the item LM (the demo's catalog is sparse, so the per-catalog rule picks
# content item features) sized for a few minutes on 2 cores, with candidate blocks
# long enough (24 description words) that reusing their KV pays.
DEMO_TRAINING = dict(
    recipe="item-lm",
    size="micro",
    steps=400,
    pretrain_worlds=4,
    item_text_words=24,
    threads=1,  # the micro model: one torch thread did the demo in 4.2 CPU-min, two took 10.7 CPU-min
)


def _repo_args(p) -> None:
    p.add_argument("--repo", default=DEMO_REPO, help=f"feature repo folder (default {DEMO_REPO})")
    p.add_argument("--online-store", default="sqlite", help="sqlite (default) or redis://host:port")
    p.add_argument(
        "--skip-bad-rows", action="store_true", help="count and skip malformed rows instead of failing"
    )


def _evaluate_args(p, timing_samples: int = 200) -> None:
    p.add_argument("--model", help="evaluate this model (HF folder or MLflow URI) instead of training one")
    p.add_argument("--max-users", type=int, help="evaluate the first this many test users (default: all)")
    p.add_argument("--candidates", type=int, default=20, help="retriever candidates ranked (default 20)")
    p.add_argument(
        "--timing-samples",
        type=int,
        default=timing_samples,
        help=f"users timed per mode, warm, on prompts new to each engine (default {timing_samples})",
    )
    _serving_args(p)


def _serving_args(p) -> None:
    p.add_argument("--policy", help=f"rcllm selection policy (default {DEFAULT_POLICY})")
    p.add_argument("--store", help="block store URL (default local://)")
    _model_device_args(p)


SERVING_FLAGS = ("mode", "policy", "store", "device", "dtype")


def serving_overrides(args) -> dict:
    """The :class:`RecommenderConfig` fields the serving flags set (``None``: not given)."""
    return {name: getattr(args, name, None) for name in SERVING_FLAGS}


def _model_device_args(p) -> None:
    """Where the served model runs (``RecommenderConfig.device`` / ``dtype``)."""
    p.add_argument("--device", help="cpu (default), cuda, cuda:N or auto (CUDA when present)")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="model dtype (default auto: bfloat16 on CUDA where the ranker allows it, else float32)",
    )
