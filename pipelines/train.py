"""Retraining pipeline (first version): train the ranker on next-item ranking with the
verbalizer objective — cross-entropy over the K label-token logits at the last position.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from rcllm_sdk.model.ranker import PRESETS, Ranker, build_ranker, save_ranker
from rcllm_sdk.model.scoring import at_last_token, label_logits, pad_batch
from rcllm_sdk.model.tokenizer import label_token_ids, train_tokenizer
from rcllm_sdk.prompt import ItemInfo, PromptTemplate, item_token
from rcllm_sdk.retrieval import Retriever

from .block_mask import block_attention_mask, mixed_layouts
from .examples import BlockEncoder, Example, build_examples

RECIPES = ("verbalizer", "item-lm")
RECIPE_DEFAULTS = {
    "verbalizer": {"batch_size": 32, "lr": 2e-3},  # (batch_size, lr) left as None take these
    "item-lm": {"batch_size": 64, "lr": 3e-3},
}  # as measured on MovieLens-1M (README, "Round 8")


@dataclass(slots=True)
class TrainConfig:
    """Ranker training settings. ``steps`` x ``batch_size`` prompts are seen in total."""

    size: str = "small"
    steps: int = 600
    batch_size: int | None = None  # None: the recipe's default (RECIPE_DEFAULTS)
    lr: float | None = None  # None: the recipe's default
    weight_decay: float = 0.01
    warmup: int = 30
    candidates: int = 20
    max_examples: int = 20_000
    vocab_size: int = 4000
    seed: int = 0
    threads: int = 0  # 0 = torch default
    # Both off by default: measured on the synthetic default (README, "What the ranker learns"),
    # neither made a from-scratch ranker beat the retriever within 3,000 steps.
    shuffle_candidates: bool = False  # random candidate order per example: position carries no signal
    history_lm_weight: float = 0.0  # auxiliary next-token loss over the history block (item dynamics)
    # Block-aware fine-tuning: train with the attention structure `rcllm` serves with (user and
    # item blocks see only the system block and themselves; labels and query see everything).
    block_aware: bool = False
    block_aware_fraction: float = 1.0  # with block_aware: share of prompts with the block mask, the rest full
    item_text_words: int = 0  # description words in each item block (template default: none)
    # "verbalizer": every weight trained on the label cross-entropy. "item-lm": an item-level
    # language model over the user blocks, the label lookup compiled around it and K + 1 readout
    # weights fitted on the label cross-entropy (pipelines/item_lm_ranker.py; README, "Round 8").
    recipe: str = "verbalizer"
    item_lm_window: int = 40  # item-lm: history items per training window
    item_lm_rank: int = 0  # item-lm: dimensions of the next-item score carried into the lookup (0: all)
    item_lm_patience: int = (
        3  # item-lm: early-stopping checks without improvement (0: off; see train_item_lm)
    )
    # item-lm: "id" learns one embedding per item token; "content" computes them from what the prompt
    # shows (categories, series and part read off titles, popularity) and marks each history line's
    # relation to the previous one (pipelines/content_item_lm.py; README, "Round 10").
    item_features: str = "id"
    pretrain_worlds: int = 0  # item-lm with content features: also train on this many synthetic worlds

    def __post_init__(self):
        if self.size not in PRESETS:
            raise ValueError(f"size must be one of {list(PRESETS)}, got {self.size!r}")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {list(RECIPES)}, got {self.recipe!r}")
        for name, value in RECIPE_DEFAULTS[self.recipe].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.recipe == "item-lm":
            self._check_item_lm()
        elif self.item_features != "id" or self.pretrain_worlds:
            raise ValueError("item_features and pretrain_worlds are options of the item-lm recipe")
        if self.steps < 1 or self.batch_size < 1 or self.max_examples < 1 or self.candidates < 2:
            raise ValueError("steps, batch_size and max_examples must be >= 1 and candidates >= 2")
        if not 0.0 < self.block_aware_fraction <= 1.0:
            raise ValueError(f"block_aware_fraction must be in (0, 1], got {self.block_aware_fraction}")

    def _check_item_lm(self) -> None:
        from .item_lm_ranker import ITEM_LM_SHAPES

        unused = [
            name
            for name, on in (
                ("block_aware", self.block_aware),
                ("shuffle_candidates", self.shuffle_candidates),
                ("history_lm_weight", self.history_lm_weight),
            )
            if on
        ]
        if unused:
            raise ValueError(f"{', '.join(unused)}: only for the verbalizer recipe, not item-lm")
        hidden, _, heads, _ = ITEM_LM_SHAPES[self.size]
        if self.candidates > hidden // heads:
            raise ValueError(
                f"item-lm binds at most {hidden // heads} candidates (one attention head), got {self.candidates}"
            )
        if not 0 <= self.item_lm_rank <= hidden:
            raise ValueError(
                f"item_lm_rank must be between 0 (all dimensions) and the item LM's hidden size {hidden}"
            )
        if self.item_lm_window < 1 or self.item_lm_patience < 0:
            raise ValueError("item_lm_window must be >= 1 and item_lm_patience >= 0")
        if self.item_features not in ("id", "content"):
            raise ValueError(f"item_features must be id or content, got {self.item_features!r}")
        if self.pretrain_worlds < 0 or (self.pretrain_worlds and self.item_features != "content"):
            raise ValueError(
                "pretrain_worlds needs item_features='content' (id embeddings do not transfer) and must be >= 0"
            )


def tokenizer_corpus(catalog: dict[int, ItemInfo], template: PromptTemplate) -> list[str]:
    """Item lines as prompts show them, without the item tokens (those are added whole)."""
    return [
        template.item_line(i.item_id, i.title, i.category, i.text, with_text=True).removeprefix(
            item_token(i.item_id)
        )
        for i in catalog.values()
    ]


def train_ranker(
    groups: list[tuple[list[list[int]], Retriever]],
    catalog: dict[int, ItemInfo],
    item_vectors: dict[int, np.ndarray],
    out_dir: str | Path,
    config: TrainConfig = TrainConfig(),
    template: PromptTemplate | None = None,
    progress: bool = True,
) -> tuple[Ranker, dict]:
    """Train tokenizer and ranker and save them to ``out_dir``.

    ``groups`` pairs training sequences with the retriever that proposes their candidates (see
    :func:`examples.build_examples`). Item-token embeddings start from ``item_vectors`` (the
    co-occurrence embeddings), so the model begins with item signal. Returns the saved ranker
    and a summary (examples, loss, seconds).
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.recipe == "item-lm":
        from .item_lm_ranker import train_item_lm_ranker

        return train_item_lm_ranker(groups, catalog, out_dir, config, template, progress)
    template = template or PromptTemplate(item_text_words=config.item_text_words)
    started = time.perf_counter()
    tokenizer = train_tokenizer(
        tokenizer_corpus(catalog, template), catalog.keys(), template, config.vocab_size
    )
    ranker = build_ranker(tokenizer, template, PRESETS[config.size], item_vectors, config.seed)
    examples, stats = build_examples(
        groups, config.candidates, max_examples=config.max_examples, seed=config.seed
    )
    if not examples:
        raise ValueError("no training examples: the retriever never ranked a true next item in its top-K")
    losses = _fit(ranker, examples, catalog, config, progress)
    summary = {
        **stats,
        "final_loss": float(np.mean(losses[-20:])),
        "train_seconds": time.perf_counter() - started,
        "parameters": sum(p.numel() for p in ranker.model.parameters()),
        **asdict(config),
    }
    save_ranker(ranker, out_dir, training=summary)
    return ranker, summary


def _fit(
    ranker: Ranker, examples: list[Example], catalog, config: TrainConfig, progress: bool
) -> list[float]:
    model, tok = ranker.model, ranker.tokenizer
    labels = torch.tensor(label_token_ids(tok, ranker.template.labels[: config.candidates]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    rng = np.random.default_rng(config.seed)
    encoder = BlockEncoder(catalog, ranker.template, tok)
    model.train()
    losses = []
    bar = tqdm(range(config.steps), desc="train ranker", disable=not progress, unit="step")
    for _ in bar:
        batch = [examples[i] for i in rng.integers(0, len(examples), config.batch_size)]
        if config.shuffle_candidates:
            batch = [_shuffled(e, rng) for e in batch]
        encoded = [encoder.encode_blocks(e) for e in batch]
        ids, mask, lengths = pad_batch([e[0] for e in encoded], tok.pad_token_id)
        if config.block_aware:
            layouts = mixed_layouts([layout for _, layout in encoded], config.block_aware_fraction, rng)
            mask = block_attention_mask(layouts, ids.shape[1])
        hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, H]
        logits = label_logits(model, at_last_token(hidden, lengths), labels)  # [B, K]
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([e.target for e in batch]))
        if config.history_lm_weight:
            loss = loss + config.history_lm_weight * _history_lm_loss(
                model, hidden, ids, [_user_span(layout) for _, layout in encoded]
            )
        take_step(model, optimizer, schedule, loss, losses, bar)
    model.eval()
    return losses


def _history_lm_loss(
    model, hidden: torch.Tensor, ids: torch.Tensor, spans: list[tuple[int, int]]
) -> torch.Tensor:
    """Next-token cross-entropy inside each history block: teaches which item follows which."""
    rows = torch.cat([torch.full((end - start - 1,), b) for b, (start, end) in enumerate(spans)])
    cols = torch.cat([torch.arange(start, end - 1) for start, end in spans])
    logits = model.get_output_embeddings()(hidden[rows, cols])  # [N, vocab]
    return torch.nn.functional.cross_entropy(logits, ids[rows, cols + 1])


def _user_span(layout: list[tuple[str, int]]) -> tuple[int, int]:
    start = layout[0][1]  # the user block follows the system block
    return start, start + layout[1][1]


def _shuffled(example: Example, rng: np.random.Generator) -> Example:
    order = rng.permutation(len(example.candidates))
    candidates = tuple(example.candidates[i] for i in order)
    return Example(example.history, candidates, int(np.flatnonzero(order == example.target)[0]))


def take_step(model, optimizer, schedule, loss: torch.Tensor, losses: list[float], bar) -> None:
    """One clipped optimiser and schedule step; records the loss and shows its running mean on ``bar``."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    losses.append(loss.item())
    bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")


def lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
