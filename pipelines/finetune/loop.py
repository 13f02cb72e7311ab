"""The finetune training loop: label loss on serving's prompts, gradient accumulation, autocast and
devices through Accelerate (one process here, one per GPU under ``accelerate launch``), clipped
AdamW with the recipes' warmup-cosine schedule, periodic checkpoints."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from rcllm_sdk.model.scoring import label_logits, last_hidden, pad_batch

from .. import curves
from ..block_mask import block_attention_mask, mixed_layouts
from ..examples import BlockEncoder, Example
from ..train import lr_factor
from ..train_config import TrainConfig
from .checkpoint import load_checkpoint, save_checkpoint


class LabelScorer(torch.nn.Module):
    """Label logits at each prompt's last token, computed as ``mode="full"`` serving computes them
    (the decoder's final hidden state times the label rows of the output head): ``[B, K]``."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids, mask, lengths, label_ids) -> torch.Tensor:
        return label_logits(self.lm, last_hidden(self.lm, ids, mask, lengths), label_ids)


@dataclass(slots=True)
class Batches:
    """Training batches drawn at random, seeded by (seed, process, step, micro-batch): a step's
    batch and dropout do not depend on what ran before it, so a resumed run repeats exactly."""

    examples: list[Example]
    encoder: BlockEncoder
    pad_id: int | None  # None (no pad token): pad_batch pads with 0 under the mask, as serving does
    config: TrainConfig
    process: int = 0

    def at(self, step: int, micro: int) -> tuple[torch.Tensor, ...]:
        """``ids [B, T]``, ``mask`` (``[B, T]``; block-aware ``[B, 1, T, T]``), ``lengths [B]``,
        ``targets [B]``."""
        rng = np.random.default_rng([self.config.seed, self.process, step, micro])
        torch.manual_seed(int(rng.integers(2**62)))  # dropout
        batch = [self.examples[i] for i in rng.integers(0, len(self.examples), self.config.batch_size)]
        encoded = [self.encoder.encode_blocks(e) for e in batch]
        ids, mask, lengths = pad_batch([e[0] for e in encoded], self.pad_id)
        aware = self.config.verbalizer
        if aware.block_aware:
            layouts = mixed_layouts([layout for _, layout in encoded], aware.block_aware_fraction, rng)
            mask = block_attention_mask(layouts, ids.shape[1])
        return ids, mask, lengths, torch.tensor([e.target for e in batch])


def fit(
    model: torch.nn.Module,
    lm: torch.nn.Module,
    batches: Batches,
    label_ids: list[int],
    accelerator,
    checkpoint: Path,
    settings: dict,
    progress: bool,
) -> list[float]:
    """Train ``model``'s trainable weights (``lm`` is its causal LM) for ``config.steps`` optimiser
    steps, from the checkpoint when ``config.finetune.resume`` finds one; the loss of every step."""
    config = batches.config
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
    )
    # A fine-tune is often short: warm up over at most a tenth of it (30 of 30 steps would never train).
    warmed = replace(config, warmup=max(1, min(config.warmup, config.steps // 10)))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmed))
    scorer, optimizer = accelerator.prepare(LabelScorer(lm), optimizer)
    losses = _resumed(checkpoint, model, optimizer, schedule, settings, config, accelerator)
    labels = torch.tensor(label_ids, device=accelerator.device)
    bar = tqdm(
        range(len(losses), config.steps),
        initial=len(losses),
        total=config.steps,
        desc="fine-tune",
        unit="step",
        disable=not (progress and accelerator.is_main_process),
    )
    scorer.train()
    for step in bar:
        losses.append(_step(scorer, optimizer, schedule, batches, step, labels, accelerator))
        curves.record("train_loss", losses[-1], step + 1)
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        every = config.finetune.checkpoint_every
        if every and (step + 1) % every == 0 and step + 1 < config.steps:
            if accelerator.is_main_process:
                save_checkpoint(checkpoint, model, optimizer, schedule, losses, settings)
            accelerator.wait_for_everyone()
    scorer.eval()
    return losses


def _resumed(checkpoint, model, optimizer, schedule, settings, config, accelerator) -> list[float]:
    if not config.finetune.resume:
        return []
    if not checkpoint.is_dir():
        if accelerator.is_main_process:
            print(f"no checkpoint at {checkpoint} (resume needs the --out of the stopped run): from step 0")
        return []
    losses = load_checkpoint(checkpoint, model, optimizer, schedule, settings)
    if accelerator.is_main_process:
        print(f"resuming from {checkpoint} after step {len(losses)}")
    return losses


def _step(scorer, optimizer, schedule, batches: Batches, step: int, labels, accelerator) -> float:
    """One optimiser step over ``grad_accum`` micro-batches (gradients synchronised on the last)."""
    accumulate = batches.config.finetune.grad_accum
    total = torch.zeros((), device=accelerator.device)
    for micro in range(accumulate):
        ids, mask, lengths, targets = (t.to(accelerator.device) for t in batches.at(step, micro))
        last = micro == accumulate - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(scorer):
            logits = scorer(ids, mask, lengths, labels)  # [B, K]
            loss = torch.nn.functional.cross_entropy(logits.float(), targets) / accumulate
            accelerator.backward(loss)
        total += loss.detach()
    accelerator.clip_grad_norm_(scorer.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return accelerator.reduce(total, "mean").item()
