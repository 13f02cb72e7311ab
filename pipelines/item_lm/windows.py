"""Training windows of the item LM: the compact template and the token ids of user-block windows,
sampled at random for training and held out (last windows of a seeded share of users) for validation."""

from __future__ import annotations

import numpy as np
import torch

from rcllm_sdk.errors import ConfigError, TrainingDataError
from rcllm_sdk.prompt import ItemInfo, PromptEncoder, PromptTemplate, item_token
from rcllm_sdk.prompt.template import NEXT_MARKER


def item_lm_template(
    max_history: int = 20, item_text_words: int = 0, relation_markers: bool = False
) -> PromptTemplate:
    """Compact prompts (one item token per line; candidates' blocks may add description words) whose
    user block ends with the marker; content item LMs also mark each line's relation to the one before."""
    return PromptTemplate(
        titles=False,
        categories=False,
        history_footer=f"{NEXT_MARKER}\n",
        max_history=max_history,
        item_text_words=item_text_words,
        relation_markers=relation_markers,
    )


class UserBlockWindows:
    """Token ids of training windows: system block, user block over ``items[s:s+n]`` ending with the
    marker, then the next item's token (the marker's target). Item lines are encoded once each."""

    def __init__(self, catalog: dict[int, ItemInfo], template: PromptTemplate, tokenizer):
        self.catalog, self.template, self.tokenizer = catalog, template, tokenizer
        ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        self._head = ids(template.system) + ids(template.history_header)
        self._footer = ids(template.history_footer)
        encoder = PromptEncoder(template, tokenizer)  # item fields cleaned as serving cleans them
        cleaned = {i: encoder.clean(item) for i, item in catalog.items()}
        self._lines = {i: ids(template.item_line(i, c.title, c.category)) for i, c in cleaned.items()}
        self.item_token_ids = torch.tensor([tokenizer.convert_tokens_to_ids(item_token(i)) for i in catalog])
        self.marker_id = tokenizer.convert_tokens_to_ids(NEXT_MARKER)
        if self._footer[:1] != [self.marker_id]:
            raise ConfigError(f"the template's history footer must start with {NEXT_MARKER}")

    def encode(self, items: list[int], next_item: int) -> list[int]:
        """``system + header + lines + [marker, <next item>]``."""
        lines = [t for i in items for t in self._lines[i]]
        return self._head + lines + [self.marker_id, self._lines[next_item][0]]


VALIDATION_SHARE = 20  # with early stopping, a seeded random 1/20 of the training sequences is held out
MAX_VALIDATION_WINDOWS = 512


def sample_windows(sequences: list[list], encode, config, rng) -> list[list[int]]:
    """``config.batch_size`` random windows of at most ``config.item_lm.window`` consecutive items and
    the item after them, as ``encode(items, next_item)`` writes them."""
    batch = []
    for n in rng.integers(0, len(sequences), config.batch_size):
        seq = sequences[n]
        length = min(config.item_lm.window, len(seq) - 1)
        start = int(rng.integers(0, len(seq) - length))
        batch.append(encode(seq[start : start + length], seq[start + length]))
    return batch


def validation_split(sequences: list[list], encode, config) -> tuple[list, list]:
    """``(training sequences, validation windows)`` over the sequences of two or more items: a seeded
    random ``1 / VALIDATION_SHARE`` of them held out, their last windows written by ``encode(items,
    next_item)``. No validation without early stopping or with fewer than ``VALIDATION_SHARE`` sequences."""
    usable = [s for s in sequences if len(s) >= 2]
    if not usable:
        raise TrainingDataError("no training sequence has two or more items")
    if config.item_lm.stopping_patience <= 0 or len(usable) < VALIDATION_SHARE:
        return usable, []
    held = set(
        np.random.default_rng(config.seed)
        .permutation(len(usable))[: len(usable) // VALIDATION_SHARE]
        .tolist()
    )
    last_windows = [
        encode(s[-config.item_lm.window - 1 : -1], s[-1]) for n, s in enumerate(usable) if n in held
    ]
    return [s for n, s in enumerate(usable) if n not in held], last_windows[:MAX_VALIDATION_WINDOWS]
