"""Block KV at canonical positions.

Canonical layout: the system block at positions ``0..S-1`` (its true place in every
prompt, so its KV is exact); every user or item block right after it, at ``S..S+T-1``,
attending to the system block and to itself. At assembly a block's keys are rotated from
``S`` to its real start (``model_view.shift_keys``). Positions are derived from this layout
and the system block's length, never read back from storage.
"""

from __future__ import annotations

import torch

from rcllm_sdk.kernels.attention import Attention

from .model_view import ModelView
from .runner import PackedBatch, run_selected


def empty_kv(view: ModelView, tokens: int) -> torch.Tensor:
    return torch.zeros(
        2, view.n_layers, tokens, view.n_kv_heads, view.head_dim, dtype=view.dtype, device=view.device
    )


def compute_system(view: ModelView, system_ids: list[int], attention: Attention) -> torch.Tensor:
    """KV of the system block at positions ``0..S-1``: ``[2, L, S, kv_heads, head_dim]``."""
    n = len(system_ids)
    batch = PackedBatch(
        empty_kv(view, n),
        torch.arange(n),
        torch.tensor(system_ids),
        torch.tensor([0, n]),
        torch.arange(n),
        torch.tensor([0, n]),
        torch.ones(n, dtype=torch.bool),
    )
    run_selected(view, batch.to(view.device), attention)
    return batch.kv


def compute_blocks(
    view: ModelView,
    system_kv: torch.Tensor,
    blocks: list[list[int]],
    attention: Attention,
    max_tokens: int = 8192,
) -> list[torch.Tensor]:
    """Canonical KV of many blocks, packed several per forward: ``[2, L, T_b, kv_heads, head_dim]`` each."""
    out: list[torch.Tensor] = []
    for group in _groups(blocks, system_kv.shape[2], max_tokens):
        out.extend(_compute_group(view, system_kv, group, attention))
    return out


def _groups(blocks: list[list[int]], system_len: int, max_tokens: int):
    group, size = [], 0
    for ids in blocks:
        cost = system_len + len(ids)
        if group and size + cost > max_tokens:
            yield group
            group, size = [], 0
        group.append(ids)
        size += cost
    if group:
        yield group


def _compute_group(view: ModelView, system_kv: torch.Tensor, group: list[list[int]], attention: Attention):
    s = system_kv.shape[2]
    kv = torch.cat([piece for ids in group for piece in (system_kv, empty_kv(view, len(ids)))], dim=2)
    lengths = [s + len(ids) for ids in group]
    cu_k = torch.tensor([0] + lengths).cumsum(0)
    positions = torch.cat([torch.arange(n) for n in lengths])
    token_ids = torch.cat([torch.tensor([0] * s + list(ids)) for ids in group])
    selected = torch.cat(
        [torch.arange(int(start) + s, int(end)) for start, end in zip(cu_k[:-1], cu_k[1:], strict=False)]
    )
    cu_q = torch.tensor([0] + [len(ids) for ids in group]).cumsum(0)
    run_selected(
        view,
        PackedBatch(
            kv, positions, token_ids, cu_k, selected, cu_q, torch.ones(len(selected), dtype=torch.bool)
        ).to(view.device),
        attention,
    )
    return [
        kv[:, :, int(start) + s : int(end)].clone() for start, end in zip(cu_k[:-1], cu_k[1:], strict=False)
    ]
