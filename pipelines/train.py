"""``rcllm train``: the verbalizer recipe (every weight trained on the cross-entropy over the K
label-token logits at the last position) and the dispatch to the item-lm recipe.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from rcllm_sdk.errors import TrainingDataError
from rcllm_sdk.model.ranker import PRESETS, Ranker, build_ranker, save_ranker
from rcllm_sdk.model.scoring import at_last_token, label_logits, pad_batch
from rcllm_sdk.model.tokenizer import label_token_ids, train_tokenizer
from rcllm_sdk.prompt import ItemInfo, PromptTemplate, item_token
from rcllm_sdk.retrieval import Retriever

from . import curves
from .block_mask import block_attention_mask, mixed_layouts
from .examples import BlockEncoder, Example, build_examples
from .train_config import TrainConfig

__all__ = ["TrainConfig", "train_ranker", "recipe_template", "tokenizer_corpus", "take_step", "lr_factor"]


def tokenizer_corpus(catalog: dict[int, ItemInfo], template: PromptTemplate) -> list[str]:
    """Item lines as prompts show them, without the item tokens (those are added whole)."""
    return [
        template.item_line(i.item_id, i.title, i.category, i.text, with_text=True).removeprefix(
            item_token(i.item_id)
        )
        for i in catalog.values()
    ]


def recipe_template(config: TrainConfig) -> PromptTemplate:
    """The prompt template of ``config.template`` (YAML), else the default with its item text words."""
    if config.template:
        from rcllm_sdk.prompt.template_file import load_template

        return load_template(config.template)
    return PromptTemplate(item_text_words=config.item_text_words)


def train_ranker(
    groups: list[tuple[list[list[int]], Retriever]],
    catalog: dict[int, ItemInfo],
    item_vectors: dict[int, np.ndarray],
    out_dir: str | Path,
    config: TrainConfig | None = None,
    template: PromptTemplate | None = None,
    progress: bool = True,
) -> tuple[Ranker, dict]:
    """Train tokenizer and ranker and save them to ``out_dir``.

    ``groups`` pairs training sequences with the retriever that proposes their candidates (see
    :func:`examples.build_examples`). Item-token embeddings start from ``item_vectors`` (the
    co-occurrence embeddings), so the model begins with item signal. Returns the saved ranker
    and a summary (examples, loss, seconds).
    """
    config = (config or TrainConfig()).for_catalog(
        sum(len(s) for group, _ in groups for s in group), len(catalog)
    )
    if progress:
        print(f"training recipe {config.recipe}: {config.choice}")
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.recipe == "item-lm":
        from .item_lm import train_item_lm_ranker

        return train_item_lm_ranker(groups, catalog, out_dir, config, template, progress)
    if config.recipe == "finetune":
        from .finetune import finetune_ranker

        return finetune_ranker(groups, catalog, out_dir, config, template, progress)
    template = template or recipe_template(config)
    started = time.perf_counter()
    tokenizer = train_tokenizer(
        tokenizer_corpus(catalog, template), catalog.keys(), template, config.vocab_size
    )
    ranker = build_ranker(tokenizer, template, PRESETS[config.size], item_vectors, config.seed)
    examples, stats = build_examples(
        groups, config.candidates, max_examples=config.max_examples, seed=config.seed
    )
    if not examples:
        raise TrainingDataError(
            "no training examples: the retriever never ranked a true next item in its top-K"
        )
    losses = _fit(ranker, examples, catalog, config, progress)
    summary = {
        **stats,
        "final_loss": float(np.mean(losses[-20:])),
        "train_seconds": time.perf_counter() - started,
        "parameters": sum(p.numel() for p in ranker.model.parameters()),
        **config.record(),
    }
    save_ranker(ranker, out_dir, training=summary)
    return ranker, summary


def _fit(
    ranker: Ranker, examples: list[Example], catalog, config: TrainConfig, progress: bool
) -> list[float]:
    model, tok = ranker.model, ranker.tokenizer
    template = ranker.template
    labels = torch.tensor(label_token_ids(tok, template.labels[: config.candidates], template.label_format))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    rng = np.random.default_rng(config.seed)
    encoder = BlockEncoder(catalog, ranker.template, tok)
    model.train()
    losses = []
    bar = tqdm(range(config.steps), desc="train ranker", disable=not progress, unit="step")
    for _ in bar:
        batch = [examples[i] for i in rng.integers(0, len(examples), config.batch_size)]
        if config.verbalizer.shuffle_candidates:
            batch = [_shuffled(e, rng) for e in batch]
        encoded = [encoder.encode_blocks(e) for e in batch]
        ids, mask, lengths = pad_batch([e[0] for e in encoded], tok.pad_token_id)
        if config.verbalizer.block_aware:
            layouts = mixed_layouts(
                [layout for _, layout in encoded], config.verbalizer.block_aware_fraction, rng
            )
            mask = block_attention_mask(layouts, ids.shape[1])
        hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, H]
        logits = label_logits(model, at_last_token(hidden, lengths), labels)  # [B, K]
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([e.target for e in batch]))
        if config.verbalizer.history_lm_weight:
            loss = loss + config.verbalizer.history_lm_weight * _history_lm_loss(
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
    curves.record("train_loss", losses[-1], len(losses))
    bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warmup over ``config.warmup`` steps, then cosine down to 10% at ``config.steps``."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
