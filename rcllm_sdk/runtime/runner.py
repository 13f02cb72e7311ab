"""Partial prefill: run only selected tokens through the decoder over an assembled KV cache.

Several requests are packed along the token axis (see ``kernels/attention.py`` for the
layout). Per layer, the selected rows get fresh q/k/v from their hidden states, their K/V
overwrite the assembled cache in place, and they attend over every key of their request
that is causally visible by position. Unselected tokens keep the cached K/V they came with.
With every token selected this is exactly the model's own forward (tested against HF).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rcllm_sdk.kernels.attention import Attention, AttentionPlan

from .model_view import ModelView, apply_rope


@dataclass(slots=True)
class PackedBatch:
    """The assembled cache of one or more requests and the rows to compute.

    Attributes:
        kv: ``[2, layers, N, kv_heads, head_dim]``; overwritten in place at selected rows.
        positions: ``[N]`` absolute position of every token.
        token_ids: ``[N]`` token ids (only selected rows are embedded).
        cu_k: ``[B+1]`` request b owns tokens ``cu_k[b]:cu_k[b+1]``.
        selected: ``[n]`` token indices to compute, ascending, grouped by request.
        cu_q: ``[B+1]`` request b owns selected rows ``cu_q[b]:cu_q[b+1]``.
        pinned: ``[n]`` bool, rows a narrowing policy must keep (fresh tokens).
    """

    kv: torch.Tensor
    positions: torch.Tensor
    token_ids: torch.Tensor
    cu_k: torch.Tensor
    selected: torch.Tensor
    cu_q: torch.Tensor
    pinned: torch.Tensor

    def to(self, device: torch.device) -> PackedBatch:
        """The index tensors on ``device`` (``kv`` is already there: it is filled in place)."""
        return PackedBatch(
            self.kv,
            *(
                t.to(device)
                for t in (self.positions, self.token_ids, self.cu_k, self.selected, self.cu_q, self.pinned)
            ),
        )


def ranges_mask(ranges: list[tuple[int, int]], length: int) -> torch.Tensor:
    """``[length]`` bool, True inside the half-open ``ranges``."""
    mask = torch.zeros(length, dtype=torch.bool)
    for start, end in ranges:
        mask[start:end] = True
    return mask


@dataclass(slots=True, frozen=True)
class Narrowing:
    """CacheBlend-style selection made inside the forward: every row runs through
    ``check_layer``; there each request keeps its pinned rows plus the ``ratio`` of its other
    rows whose fresh K/V deviate most from the cached K/V; later layers run only those."""

    ratio: float
    check_layer: int


@dataclass(slots=True)
class ForwardContext:
    """What every layer of one partial prefill shares, built once per forward.

    Attributes:
        kv: ``[2, layers, N, kv_heads, head_dim]`` assembled cache, written at selected rows.
        selected: ``[n]`` rows of ``kv`` being computed.
        cos, sin: ``[n, 1, head_dim]`` rotary tables at the selected rows' positions.
        pinned: ``[n]`` bool, rows a narrowing policy must keep.
        attention: the backend the engine chose; ``plan`` its positions and offsets
            (``q_pos [n]``, ``k_pos [N]``, ``cu_q``/``cu_k [B+1]``).
    """

    kv: torch.Tensor
    selected: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    pinned: torch.Tensor
    attention: Attention
    plan: AttentionPlan

    @classmethod
    def of(cls, view: ModelView, batch: PackedBatch, attention: Attention, like: torch.Tensor):
        q_pos = batch.positions[batch.selected]  # [n]
        cos, sin = view.rope(q_pos, like)
        plan = attention.plan(q_pos, batch.positions, batch.cu_q, batch.cu_k)
        return cls(batch.kv, batch.selected, cos, sin, batch.pinned, attention, plan)

    def keep(self, rows: torch.Tensor) -> None:
        """Narrow to ``rows`` (ascending indices into the current selected rows) and re-plan."""
        p = self.plan
        self.selected, self.cos, self.sin, self.pinned = (
            t[rows] for t in (self.selected, self.cos, self.sin, self.pinned)
        )
        self.plan = self.attention.plan(p.q_pos[rows], p.k_pos, torch.searchsorted(rows, p.cu_q), p.cu_k)


@torch.inference_mode()
def run_selected(
    view: ModelView, batch: PackedBatch, attention: Attention, narrowing: Narrowing | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final-norm hidden state of the last selected row of every request, ``[B, hidden]``,
    and the number of selected rows per request that ran every layer, ``[B]``."""
    hidden = view.base.embed_tokens(batch.token_ids[batch.selected])  # [n, hidden]
    ctx = ForwardContext.of(view, batch, attention, hidden)
    for index, layer in enumerate(view.layers):
        if narrowing is not None and index == narrowing.check_layer:
            hidden, deviation = _layer(view, layer, index, hidden, ctx, measure=True)
            rows = _most_deviating(deviation, ctx.pinned, ctx.plan.cu_q, narrowing.ratio)
            hidden = hidden[rows]
            ctx.keep(rows)
        else:
            hidden, _ = _layer(view, layer, index, hidden, ctx)
    cu_q = ctx.plan.cu_q
    return view.base.norm(hidden[cu_q[1:] - 1]), cu_q[1:] - cu_q[:-1]


def _layer(view: ModelView, layer, index: int, hidden: torch.Tensor, ctx: ForwardContext, measure=False):
    """One decoder layer over the selected rows: ``hidden [n, hidden]`` -> ``[n, hidden]``, and
    with ``measure`` each row's squared K/V deviation from the cache (``[n]``)."""
    attn, n = layer.self_attn, hidden.shape[0]
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x).view(n, view.n_heads, view.head_dim)
    k = attn.k_proj(x).view(n, view.n_kv_heads, view.head_dim)
    v = attn.v_proj(x).view(n, view.n_kv_heads, view.head_dim)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
    keys, values = ctx.kv[0, index], ctx.kv[1, index]  # [N, kv_heads, head_dim]
    deviation = None
    if measure:
        deviation = (k - keys[ctx.selected]).float().square().sum((1, 2)) + (
            v - values[ctx.selected]
        ).float().square().sum((1, 2))
    keys[ctx.selected] = k
    values[ctx.selected] = v
    out = ctx.attention.attend(ctx.plan, q, keys, values, attn.scaling)  # [n, heads, head_dim]
    hidden = hidden + attn.o_proj(out.reshape(n, -1))
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden, deviation


def _most_deviating(
    deviation: torch.Tensor, pinned: torch.Tensor, cu_q: torch.Tensor, ratio: float
) -> torch.Tensor:
    """Row indices kept after the check layer: pinned rows plus each request's top ``ratio``."""
    keep = pinned.clone()
    bounds = cu_q.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=False):
        free = torch.nonzero(~pinned[start:end]).flatten() + start
        count = int(round(ratio * len(free)))
        if count:
            keep[free[torch.topk(deviation[free], count).indices]] = True
    return torch.nonzero(keep).flatten()
