"""Attention masks for block-aware fine-tuning.

The server reuses user and item blocks whose KV was computed with the block alone after the
system block. Training with the same structure teaches the model not to rely on what those
blocks cannot see: tokens of a user or item block attend to the system block and causally
within their own block; system tokens attend causally among themselves; fresh tokens
(labels, query) attend causally to everything, as in the served forward.
"""

from __future__ import annotations

import torch

from rcllm_sdk.prompt.renderer import LABEL, QUERY, SYSTEM

FRESH = (LABEL, QUERY)


def block_attention_mask(layouts: list[list[tuple[str, int]]], length: int) -> torch.Tensor:
    """``[B, 1, length, length]`` bool (True = may attend) for right-padded prompts.

    ``layouts[b]`` lists ``(kind, n_tokens)`` of prompt b's blocks in order; padding rows
    attend to themselves only (their outputs are never read).
    """
    masks = torch.zeros(len(layouts), 1, length, length, dtype=torch.bool)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for b, layout in enumerate(layouts):
        block_id = _block_ids(layout, length)  # [T], -1 for padding
        system = torch.tensor(
            [kind == SYSTEM for kind, n in layout for _ in range(n)]
            + [False] * (length - sum(n for _, n in layout))
        )
        fresh_row = torch.tensor(
            [kind in FRESH for kind, n in layout for _ in range(n)]
            + [False] * (length - sum(n for _, n in layout))
        )
        same_block = block_id[:, None] == block_id[None, :]
        allowed = same_block | system[None, :] | fresh_row[:, None]
        masks[b, 0] = allowed & causal & (block_id[None, :] >= 0)
        padding = block_id < 0
        masks[b, 0, padding] = torch.eye(length, dtype=torch.bool)[padding]  # finite rows, never read
    return masks


def with_full_attention(layout: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The same prompt as one fresh block: :func:`block_attention_mask` then gives it plain causal
    attention. Mixed training (some prompts block-aware, the rest full) uses it for the full ones."""
    return [(QUERY, sum(n for _, n in layout))]


def mixed_layouts(
    layouts: list[list[tuple[str, int]]], block_fraction: float, rng
) -> list[list[tuple[str, int]]]:
    """Each prompt keeps its block layout with probability ``block_fraction``, else sees full attention."""
    if block_fraction >= 1.0:
        return layouts
    return [layout if rng.random() < block_fraction else with_full_attention(layout) for layout in layouts]


def _block_ids(layout: list[tuple[str, int]], length: int) -> torch.Tensor:
    ids = torch.full((length,), -1, dtype=torch.long)
    start = 0
    for index, (_, n) in enumerate(layout):
        ids[start : start + n] = index
        start += n
    return ids
