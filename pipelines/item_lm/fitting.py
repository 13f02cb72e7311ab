"""Fitting the item LM: its Llama shape, the next-item loss over item tokens, the training loop
with early stopping on held-out windows (keeping the best weights)."""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from rcllm_sdk.model.scoring import pad_batch

from .. import curves
from ..train import lr_factor, take_step
from .windows import UserBlockWindows, sample_windows, validation_split

ROPE_THETA = (
    1e6  # the compiled layers match content through the slowest rotary pair, nearly still at this base
)
ITEM_LM_SHAPES = {  # size preset -> (hidden, layers, heads, intermediate); heads of 32 dimensions
    "micro": (64, 2, 2, 128),
    "small": (128, 2, 4, 256),
    "base": (256, 4, 8, 512),
}


def item_lm_config(tokenizer, size: str, tie: bool) -> LlamaConfig:
    """The item LM's shape (``ITEM_LM_SHAPES[size]``) over ``tokenizer``'s vocabulary."""
    hidden, layers, heads, intermediate = ITEM_LM_SHAPES[size]
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        rope_theta=ROPE_THETA,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tie,
    )


def train_item_lm(
    sequences: list[list[int]], windows: UserBlockWindows, config, progress: bool = True
) -> tuple[LlamaForCausalLM, list[float], dict]:
    """A Llama (shape ``ITEM_LM_SHAPES[config.size]``) trained on next-item prediction inside user
    blocks: at every history line's end and at the marker, cross-entropy over the item tokens only
    (text tokens are never targets). ``config`` is a ``TrainConfig``: ``steps`` x ``batch_size``
    windows of ``item_lm_window`` consecutive items.

    Early stopping (``config.item_lm.stopping_patience`` > 0): a seeded random twentieth of the
    sequences is held out; their last windows are scored every ``steps // 20`` steps (at least 25),
    training stops after ``patience`` checks without a better validation loss, and the best weights
    are returned (item LMs memorise beyond a few passes over the data). Returns
    ``(model, losses, record)``.
    """
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(item_lm_config(windows.tokenizer, config.size, tie=True))
    train, validation = validation_split(sequences, windows.encode, config)
    loss_of = _ItemLoss(windows)
    rng = np.random.default_rng(config.seed)
    return fit_item_lm(
        model,
        lambda: loss_of(model, sample_windows(train, windows.encode, config, rng)),
        (lambda: loss_of.evaluate(model, validation)) if validation else None,
        config,
        "item LM",
        progress,
    )


def fit_item_lm(
    model, next_loss, validation_loss, config, name: str, progress: bool
) -> tuple[torch.nn.Module, list[float], dict]:
    """``config.steps`` optimiser steps on ``next_loss()`` (AdamW, warm-up and cosine schedule).
    With ``validation_loss`` (None: no validation), early stopping: checked every ``steps // 20``
    steps (at least 25), stop after ``config.item_lm.stopping_patience`` checks without a lower loss and
    return the best weights. Returns ``(model, losses, record)``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    losses, stopper = [], _EarlyStopping(config.item_lm.stopping_patience, max(25, config.steps // 20))
    model.train()
    bar = tqdm(range(config.steps), desc=f"train {name}", disable=not progress, unit="step")
    for step in bar:
        take_step(model, optimizer, schedule, next_loss(), losses, bar)
        if validation_loss and stopper.due(step + 1, config.steps):
            if stopper.record(model, validation_loss(), step + 1):
                break
    bar.close()
    if progress and validation_loss:
        best = f"best validation loss {stopper.best:.4f} at step {stopper.best_step}"
        print(f"{name}: {step + 1} steps run; {best}")
    return stopper.restore(model).eval(), losses, stopper.summary(step + 1)


@torch.no_grad()
def mean_loss(model, loss_of_batch, windows: list[list[int]], batch: int = 128) -> float:
    """Window-weighted mean of ``loss_of_batch`` over ``windows``, in eval mode."""
    model.eval()
    total = sum(
        float(loss_of_batch(windows[n : n + batch])) * len(windows[n : n + batch])
        for n in range(0, len(windows), batch)
    )
    model.train()
    return total / len(windows)


class _ItemLoss:
    """Cross-entropy over item tokens at the positions whose next token is an item."""

    def __init__(self, windows: UserBlockWindows):
        tok = windows.tokenizer
        self.pad_id, self.item_ids = tok.pad_token_id, windows.item_token_ids
        self.is_item = torch.zeros(len(tok), dtype=torch.bool)
        self.is_item[self.item_ids] = True
        self.column = torch.full((len(tok),), -1, dtype=torch.long)
        self.column[self.item_ids] = torch.arange(len(self.item_ids))

    def __call__(self, model, batch: list[list[int]]) -> torch.Tensor:
        ids, mask, _ = pad_batch(batch, self.pad_id)
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        targets = ids[:, 1:]
        rows, cols = torch.nonzero(self.is_item[targets] & (mask[:, 1:] > 0), as_tuple=True)
        logits = hidden[rows, cols] @ model.lm_head.weight[self.item_ids].T  # item tokens only
        return torch.nn.functional.cross_entropy(logits, self.column[targets[rows, cols]])

    def evaluate(self, model, windows: list[list[int]], batch: int = 128) -> float:
        return mean_loss(model, lambda part: self(model, part), windows, batch)


class _EarlyStopping:
    """Keeps the weights with the lowest validation loss; says stop after ``patience`` checks without one."""

    def __init__(self, patience: int, every: int):
        self.patience, self.every = patience, every
        self.best, self.best_step, self.best_state, self.since_best, self.history = math.inf, 0, None, 0, []

    def due(self, step: int, last: int) -> bool:
        return step % self.every == 0 or step == last

    def record(self, model, loss: float, step: int) -> bool:
        self.history.append((step, round(loss, 4)))
        curves.record("validation_loss", loss, step)
        if loss < self.best:
            self.best, self.best_step, self.since_best = loss, step, 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.since_best += 1
        return self.since_best >= self.patience

    def restore(self, model):
        if self.best_state is not None:
            model.load_state_dict(self.best_state)
        return model

    def summary(self, steps_run: int) -> dict:
        if not self.history:
            return {"item_lm_steps_run": steps_run}
        return {
            "item_lm_steps_run": steps_run,
            "item_lm_best_step": self.best_step,
            "item_lm_validation_loss": round(self.best, 4),
            "item_lm_validation_history": self.history,
        }
