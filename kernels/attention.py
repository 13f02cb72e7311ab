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
tested against).
"""

from __future__ import annotations

import torch


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
    """Reference semantics of :func:`selective_attention`, one SDPA call per request."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.zeros_like(q)
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    for b in range(len(bounds_q) - 1):
        qs, qe, ks, ke = bounds_q[b], bounds_q[b + 1], bounds_k[b], bounds_k[b + 1]
        if qe == qs or ke == ks:
            continue
        out[qs:qe] = attend_one(q[qs:qe], k[ks:ke], v[ks:ke], q_pos[qs:qe], k_pos[ks:ke], scale)
    return out


QUERY_CHUNK = 64  # query rows per score matrix: bounds memory, lets ascending keys be cut causally


def attend_one(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float
) -> torch.Tensor:
    """One request: ``q [n, Hq, D]`` over ``k, v [T, Hkv, D]`` -> ``[n, Hq, D]``.

    Two exact paths, whichever is faster for the shape: a causal suffix (queries at the last
    n positions of keys 0..T-1, what prefix caching computes) runs SDPA's fused CPU kernel
    without a mask; scattered rows (selective recompute) run batched matmuls per chunk of
    rows, reading only the keys the chunk can see when key positions ascend.
    """
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    if _FLASH_CPU is not None and not q.is_cuda and _is_causal_suffix(q_pos, k_pos):
        groups = q.shape[1] // k.shape[1]
        qh = q.transpose(0, 1).to(work)[None]  # [1, Hq, n, D]
        kh, vh = (x.transpose(0, 1).to(work).repeat_interleave(groups, dim=0)[None] for x in (k, v))
        return _causal_suffix(qh, kh, vh, len(k_pos) - len(q_pos), scale)[0].transpose(0, 1).to(q.dtype)
    return _scattered(q, k.to(work), v.to(work), q_pos, k_pos, scale, work)


def _scattered(q, k, v, q_pos, k_pos, scale: float, work: torch.dtype) -> torch.Tensor:
    n, heads, dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    keys_t, values = k.permute(1, 2, 0), v.transpose(0, 1)  # [Hkv, D, T], [Hkv, T, D]
    ascending = bool((k_pos[1:] >= k_pos[:-1]).all())
    out = torch.zeros_like(q)
    for start in range(0, n, QUERY_CHUNK):
        rows, pos = q[start : start + QUERY_CHUNK].to(work), q_pos[start : start + QUERY_CHUNK]
        m = rows.shape[0]
        lo, hi = _key_window(k_pos, pos, ascending)
        if hi == 0:
            continue  # no key visible to any row of this chunk
        grouped = rows.view(m, kv_heads, groups, dim).permute(1, 2, 0, 3).reshape(kv_heads, groups * m, dim)
        scores = torch.bmm(grouped, keys_t[:, :, :hi]).mul_(scale).view(kv_heads, groups, m, hi)
        scores[..., lo:hi].masked_fill_(k_pos[None, lo:hi] > pos[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).view(kv_heads, groups * m, hi)
        mixed = torch.bmm(probs, values[:, :hi]).view(kv_heads, groups, m, dim).permute(2, 0, 1, 3)
        out[start : start + m] = mixed.reshape(m, heads, dim).to(q.dtype)
    blind = ~(k_pos[None, :] <= q_pos[:, None]).any(dim=1)
    if bool(blind.any()):
        out[blind] = 0  # softmax over nothing visible gave NaN
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


def selective_attention(q, k, v, q_pos, k_pos, cu_q, cu_k, scale=None, backend: str = "auto"):
    """Dispatch: the Triton kernel on CUDA tensors, the torch path otherwise.

    ``backend``: ``auto`` | ``torch`` | ``triton``.
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be auto, torch or triton, got {backend!r}")
    if backend == "triton" or (backend == "auto" and q.is_cuda):
        from .triton_attention import selective_attention_triton  # lazy: triton is optional on CPU

        return selective_attention_triton(q, k, v, q_pos, k_pos, cu_q, cu_k, scale)
    return selective_attention_torch(q, k, v, q_pos, k_pos, cu_q, cu_k, scale)
