"""Selective attention: a scattered set of query tokens over an assembled KV cache.

Packed ("varlen") layout, several requests per call:

    q      [Nq, Hq, D]    selected query rows of all requests, request after request
    k, v   [Nk, Hkv, D]   each request's assembled keys/values, request after request
    q_pos  [Nq] int       absolute position of every query row
    k_pos  [Nk] int       absolute position of every key
    cu_q   [B+1] int      request b owns q rows cu_q[b]:cu_q[b+1]
    cu_k   [B+1] int      ... and keys cu_k[b]:cu_k[b+1]

A key is visible to a query of the same request when ``k_pos <= q_pos`` (causal by
position, not by index). Grouped-query attention: query head h reads KV head
``h // (Hq // Hkv)``. Softmax in fp32; the output has ``q``'s dtype. A query row that sees
no key gets zeros.

This module is the torch path (CPU serving, and the reference the Triton kernel is
tested against) and the backend choice. Everything that depends only on positions and
offsets (which path each request takes, each chunk's key window and causal mask, rows that
see no key) is planned once per forward (:func:`plan_attention`) and reused by every layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rcllm_sdk.errors import ConfigError

QUERY_CHUNK = 64  # query rows per score matrix: bounds memory, lets ascending keys be cut causally
BACKENDS = ("auto", "torch", "triton")


@dataclass(slots=True, frozen=True)
class ChunkPlan:
    """Query rows ``start:stop`` of one request read keys ``:hi``; keys ``lo:hi`` need ``masked``
    (``[rows, hi - lo]`` bool, True = not visible; None when every key is visible)."""

    start: int
    stop: int
    lo: int
    hi: int
    masked: torch.Tensor | None


@dataclass(slots=True, frozen=True)
class RequestPlan:
    """One request's rows ``q`` and keys ``k`` in the packed tensors and how they attend:
    ``suffix`` >= 0: a causal suffix from that key (flash path, no mask); else one masked
    SDPA call with ``visible``."""

    q: slice
    k: slice
    suffix: int
    visible: torch.Tensor | None  # [rows, keys] bool, True where the key's position <= the row's
    blind: torch.Tensor | None  # [rows] bool, rows that see no key (output zeros)


@dataclass(slots=True, frozen=True)
class AttentionPlan:
    """The position-only part of a selective attention call, shared by every layer."""

    q_pos: torch.Tensor  # [Nq]
    k_pos: torch.Tensor  # [Nk]
    cu_q: torch.Tensor  # [B+1]
    cu_k: torch.Tensor  # [B+1]
    requests: tuple[RequestPlan, ...]


def plan_attention(q_pos, k_pos, cu_q, cu_k) -> AttentionPlan:
    """Plan :func:`attend_planned` for these positions and offsets (one host sync)."""
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    requests = []
    for b in range(len(bounds_q) - 1):
        qs, qe, ks, ke = bounds_q[b], bounds_q[b + 1], bounds_k[b], bounds_k[b + 1]
        if qe > qs and ke > ks:
            requests.append(_plan_one(slice(qs, qe), slice(ks, ke), q_pos[qs:qe], k_pos[ks:ke]))
    return AttentionPlan(q_pos, k_pos, cu_q, cu_k, tuple(requests))


def _plan_one(q: slice, k: slice, q_pos: torch.Tensor, k_pos: torch.Tensor) -> RequestPlan:
    if _FLASH_CPU is not None and not q_pos.is_cuda and _is_causal_suffix(q_pos, k_pos):
        return RequestPlan(q, k, len(k_pos) - len(q_pos), None, None)
    visible = k_pos[None, :] <= q_pos[:, None]  # [rows, keys]
    blind = ~visible.any(dim=1)  # [rows]
    return RequestPlan(q, k, -1, visible, blind if bool(blind.any()) else None)


def attend_planned(plan: AttentionPlan, q, k, v, scale: float | None = None) -> torch.Tensor:
    """``q [Nq, Hq, D]`` over ``k, v [Nk, Hkv, D]`` as planned -> ``[Nq, Hq, D]`` in ``q``'s dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if len(plan.requests) == 1 and plan.requests[0].q == slice(0, q.shape[0]):
        request = plan.requests[0]  # one request covering every row: no scatter into a zero buffer
        return _attend_request(request, q, k[request.k], v[request.k], scale)
    out = torch.zeros_like(q)
    for request in plan.requests:
        out[request.q] = _attend_request(request, q[request.q], k[request.k], v[request.k], scale)
    return out


def _attend_request(request: RequestPlan, q, k, v, scale: float) -> torch.Tensor:
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qh = q.transpose(0, 1).to(work)[None]  # [1, Hq, n, D]
    if request.suffix >= 0:
        groups = q.shape[1] // k.shape[1]
        kh, vh = (x.transpose(0, 1).to(work).repeat_interleave(groups, dim=0)[None] for x in (k, v))
        return _causal_suffix(qh, kh, vh, request.suffix, scale)[0].transpose(0, 1).to(q.dtype)
    kh, vh = (x.transpose(0, 1).to(work)[None] for x in (k, v))  # [1, Hkv, T, D]
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=request.visible, scale=scale, enable_gqa=True)
    out = out[0].transpose(0, 1).to(q.dtype)  # [n, Hq, D]
    if request.blind is not None:
        out[request.blind] = 0  # softmax over nothing visible gave NaN
    return out


def _chunked(chunks, q, k, v, scale: float, work: torch.dtype) -> torch.Tensor:
    n, heads, dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    keys_t, values = k.permute(1, 2, 0), v.transpose(0, 1)  # [Hkv, D, T], [Hkv, T, D]
    out = torch.zeros_like(q)
    for c in chunks:
        rows, m = q[c.start : c.stop].to(work), c.stop - c.start
        grouped = rows.view(m, kv_heads, groups, dim).permute(1, 2, 0, 3).reshape(kv_heads, groups * m, dim)
        scores = torch.bmm(grouped, keys_t[:, :, : c.hi]).mul_(scale).view(kv_heads, groups, m, c.hi)
        if c.masked is not None:
            scores[..., c.lo : c.hi].masked_fill_(c.masked, float("-inf"))
        probs = torch.softmax(scores, dim=-1).view(kv_heads, groups * m, c.hi)
        mixed = torch.bmm(probs, values[:, : c.hi]).view(kv_heads, groups, m, dim).permute(2, 0, 1, 3)
        out[c.start : c.stop] = mixed.reshape(m, heads, dim).to(q.dtype)
    return out


def selective_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference semantics of :func:`selective_attention`: plan, then attend."""
    return attend_planned(plan_attention(q_pos, k_pos, cu_q, cu_k), q, k, v, scale)


def attend_one(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float
) -> torch.Tensor:
    """One request: ``q [n, Hq, D]`` over ``k, v [T, Hkv, D]`` -> ``[n, Hq, D]``.

    Two exact paths, whichever is faster for the shape: a causal suffix (queries at the last
    n positions of keys 0..T-1, what prefix caching computes) runs SDPA's fused CPU kernel
    without a mask; scattered rows (selective recompute) run batched matmuls per chunk of
    rows, reading only the keys the chunk can see when key positions ascend.
    """
    return _attend_request(_plan_one(slice(None), slice(None), q_pos, k_pos), q, k, v, scale)


def _scattered(q, k, v, q_pos, k_pos, scale: float, work: torch.dtype) -> torch.Tensor:
    """Scattered rows by batched matmuls per chunk of rows, reading only the keys a chunk can
    see when key positions ascend: the reference the masked SDPA path is tested against."""
    ascending = bool((k_pos[1:] >= k_pos[:-1]).all())
    chunks = []
    for start in range(0, len(q_pos), QUERY_CHUNK):
        pos = q_pos[start : start + QUERY_CHUNK]
        lo, hi = _key_window(k_pos, pos, ascending)
        if hi:
            chunks.append(ChunkPlan(start, start + len(pos), lo, hi, k_pos[None, lo:hi] > pos[:, None]))
    out = _chunked(chunks, q, k.to(work), v.to(work), scale, work)
    out[~(k_pos[None, :] <= q_pos[:, None]).any(dim=1)] = 0
    return out


def _key_window(k_pos: torch.Tensor, pos: torch.Tensor, ascending: bool) -> tuple[int, int]:
    """``[lo, hi)``: keys before ``lo`` are visible to every row, keys from ``hi`` on to none."""
    if not ascending:
        return 0, len(k_pos)
    lo = int(torch.searchsorted(k_pos, pos.min(), right=False))
    hi = int(torch.searchsorted(k_pos, pos.max(), right=True))
    return min(lo, hi), hi


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _is_causal_suffix(q_pos: torch.Tensor, k_pos: torch.Tensor) -> bool:
    n, t = len(q_pos), len(k_pos)
    return (
        0 < n <= t
        and torch.equal(k_pos, torch.arange(t, device=k_pos.device))
        and torch.equal(q_pos, torch.arange(t - n, t, device=q_pos.device))
    )


def _causal_suffix(qh, kh, vh, start: int, scale: float) -> torch.Tensor:
    """Queries at positions start..T-1 over keys 0..T-1 without a mask: the keys before
    ``start`` are visible to every query, the rest form a causal square; the two partial
    softmaxes are merged by their log-sum-exp (what a flash kernel does across key tiles)."""
    out, lse = _FLASH_CPU(qh, kh[:, :, start:], vh[:, :, start:], 0.0, True, scale=scale)
    if start == 0:
        return out
    out_prefix, lse_prefix = _FLASH_CPU(qh, kh[:, :, :start], vh[:, :, :start], 0.0, False, scale=scale)
    top = torch.maximum(lse, lse_prefix)
    w, w_prefix = torch.exp(lse - top)[..., None], torch.exp(lse_prefix - top)[..., None]
    return (out * w + out_prefix * w_prefix) / (w + w_prefix)


# ---- the backend, chosen once ----------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class Attention:
    """A resolved attention backend: ``plan`` once per forward, then ``attend`` per layer."""

    name: str  # "torch" or "triton"
    plan: Callable[..., AttentionPlan]
    attend: Callable[..., torch.Tensor]  # (plan, q, k, v, scale) -> out


def _attend_triton(plan: AttentionPlan, q, k, v, scale=None) -> torch.Tensor:
    from .triton_attention import selective_attention_triton  # lazy: triton is optional on CPU

    return selective_attention_triton(q, k, v, plan.q_pos, plan.k_pos, plan.cu_q, plan.cu_k, scale)


def _plan_triton(q_pos, k_pos, cu_q, cu_k) -> AttentionPlan:
    return AttentionPlan(q_pos, k_pos, cu_q, cu_k, ())


TORCH = Attention("torch", plan_attention, attend_planned)
TRITON = Attention("triton", _plan_triton, _attend_triton)


def resolve_attention(backend: str, device: torch.device | str) -> Attention:
    """``auto`` | ``torch`` | ``triton`` -> the backend to use on ``device`` (``auto``: the Triton
    kernel on CUDA, the torch path otherwise). Raises ConfigError for another name."""
    if backend not in BACKENDS:
        raise ConfigError(f"attention backend must be auto, torch or triton, got {backend!r}")
    if backend == "triton" or (backend == "auto" and torch.device(device).type == "cuda"):
        return TRITON
    return TORCH


def selective_attention(q, k, v, q_pos, k_pos, cu_q, cu_k, scale=None, backend: str = "auto"):
    """One call: resolve ``backend`` for ``q``'s device, plan, attend (tests and benches)."""
    attention = resolve_attention(backend, q.device)
    return attention.attend(attention.plan(q_pos, k_pos, cu_q, cu_k), q, k, v, scale)
