"""Triton kernel for selective attention (semantics: :mod:`rcllm_sdk.kernels.attention`).

Flash-attention forward with online softmax in fp32, several requests packed in one launch.
Grid: (query-row tile, KV head, request). A tile stacks ``BLOCK_M // group`` query tokens times
the ``group`` query heads that share one KV head, so each K/V tile is loaded once per KV head
rather than once per query head (GQA packing). Keys are masked by position (``k_pos <= q_pos``),
never by index. When every request's keys are sorted (checked on the device, in the same host
copy as the offsets), a binary search stops the key loop after the last key the tile can see;
otherwise the loop covers all the request's keys, and the mask alone keeps it exact.

On a machine without a GPU, Triton runs the kernel only under its interpreter:
``TRITON_INTERPRET=1`` must be set when the kernel is called. The kernel is jitted lazily, once
per mode, rather than by a decorator at import, so importing this module never fixes the mode.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from rcllm_sdk.errors import InvariantError

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)


# Nothing from tl.standard is called (tl.max, tl.sum, tl.zeros, ...): those wrappers are jitted when
# `triton` is imported, so under the interpreter they fail if `triton` was imported before
# TRITON_INTERPRET was set (as in a test session). ``tl.reduce`` with Triton's own combine
# functions is what tl.max/tl.min/tl.sum do for 32-bit and wider inputs, and the interpreter
# runs it natively.
_MAX, _SUM = tl.standard._elementwise_max, tl.standard._sum_combine


def _selective_attention_fwd(
    Q,
    K,
    V,
    Out,
    QPos,
    KPos,
    CuQ,
    CuK,
    qk_scale,  # qk_scale = softmax scale * log2(e)
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_on,
    stride_oh,
    GROUP: tl.constexpr,  # query heads per KV head
    TILE_HEADS: tl.constexpr,  # query heads stacked in one tile (<= GROUP)
    KEYS_SORTED: tl.constexpr,  # every request's k_pos is non-decreasing
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
):
    TOKENS: tl.constexpr = BLOCK_M // TILE_HEADS  # query tokens per tile
    CHUNKS: tl.constexpr = (GROUP + TILE_HEADS - 1) // TILE_HEADS
    tile, req = tl.program_id(0), tl.program_id(2)
    kv_head, chunk = tl.program_id(1) // CHUNKS, tl.program_id(1) % CHUNKS
    q_start = tl.load(CuQ + req)
    n_q = tl.load(CuQ + req + 1) - q_start
    if tile * TOKENS >= n_q:
        return
    k_start = tl.load(CuK + req)
    n_k = tl.load(CuK + req + 1) - k_start

    # rows of the tile: token-major, head-minor; out-of-range rows are clamped onto real ones
    rows = tl.arange(0, BLOCK_M)
    tok, head_in_group = tile * TOKENS + rows // TILE_HEADS, chunk * TILE_HEADS + rows % TILE_HEADS
    row_ok = (rows < TOKENS * TILE_HEADS) & (tok < n_q) & (head_in_group < GROUP)
    q_row = (q_start + tl.minimum(tok, n_q - 1)).to(tl.int64)  # [BLOCK_M]
    head = kv_head * GROUP + tl.minimum(head_in_group, GROUP - 1)  # [BLOCK_M]
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + q_row[:, None] * stride_qn + head[:, None] * stride_qh + dims[None, :])  # [M, D]
    q_pos = tl.load(QPos + q_row)  # [M]

    end = n_k  # keys [end, n_k) are invisible to every row of the tile
    if KEYS_SORTED:  # binary search: the number of keys at or before the tile's last position
        q_pos_max = tl.reduce(q_pos, 0, _MAX)
        lo, hi = n_k * 0, n_k
        while lo < hi:
            mid = (lo + hi) // 2
            right = tl.load(KPos + k_start + mid) <= q_pos_max
            lo, hi = tl.where(right, mid + 1, lo), tl.where(right, hi, mid)
        end = lo

    k_base = K + k_start.to(tl.int64) * stride_kn + kv_head * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vn + kv_head * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, tl.float32)
    for start in range(0, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col = tl.minimum(cols, n_k - 1)
        k_pos = tl.load(KPos + k_start + col)  # [N]
        k = tl.load(k_base + col[:, None] * stride_kn + dims[None, :])  # [N, D]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [M, N], log2 domain
        visible = (k_pos[None, :] <= q_pos[:, None]) & (cols < n_k)[None, :]  # causal by position
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no visible key yet
        alpha = tl.math.exp2(m_i - m_ref)
        p = tl.math.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
        v = tl.load(v_base + col[:, None] * stride_vn + dims[None, :])  # [N, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row that saw no key: acc == 0 -> zeros
    o_ptr = Out + q_row[:, None] * stride_on + head[:, None] * stride_oh + dims[None, :]
    tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=row_ok[:, None])


_JITTED: dict[bool, object] = {}


def _kernel(interpreted: bool):
    """The jitted kernel for the current mode (``triton.jit`` reads TRITON_INTERPRET when it runs)."""
    if interpreted not in _JITTED:
        _JITTED[interpreted] = triton.jit(_selective_attention_fwd)
    return _JITTED[interpreted]


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older ones read the variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def selective_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Selective attention with the Triton kernel; same semantics as ``selective_attention_torch``.

    Args:
        q: ``[Nq, Hq, D]`` selected query rows, request after request (fp16, bf16 or fp32).
        k, v: ``[Nk, Hkv, D]`` assembled keys and values, same dtype as ``q``; ``Hq % Hkv == 0``.
        q_pos, k_pos: ``[Nq]`` / ``[Nk]`` int32/int64 absolute positions (any order).
        cu_q, cu_k: ``[B+1]`` int32/int64 request offsets: start at 0, non-decreasing, end at Nq / Nk.
        scale: softmax scale, ``D ** -0.5`` when None.

    Returns:
        ``[Nq, Hq, D]`` in ``q``'s dtype; zeros for a row that sees no key.

    Raises:
        InvariantError: an input has the wrong shape, dtype, device or offsets.
        RuntimeError: CPU tensors while the Triton interpreter is off.

    ``cu_q`` and ``cu_k`` are read on the host (one device sync) to validate them and size the
    grid. A tensor whose last dimension is not contiguous is copied.

    Example:
        >>> out = selective_attention_triton(q, k, v, q_pos, k_pos, cu_q, cu_k)  # doctest: +SKIP
    """
    _check_inputs(q, k, v, q_pos, k_pos, cu_q, cu_k)
    longest, keys_sorted = _read_offsets(q.shape[0], k_pos, cu_q, cu_k)
    interpreted = _interpreting()
    if not q.is_cuda and not interpreted:
        raise RuntimeError(
            "the Triton kernel got CPU tensors but the Triton interpreter is off: set "
            "TRITON_INTERPRET=1 in the environment (slow, for tests), or use backend='torch'"
        )
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    q_pos, k_pos, cu_q, cu_k = (t.contiguous() for t in (q_pos, k_pos, cu_q, cu_k))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [Nq, Hq, D]; every row is written
    if longest > 0:
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        _launch(q, k, v, out, q_pos, k_pos, cu_q, cu_k, scale, longest, keys_sorted, interpreted)
    return out


def _launch(q, k, v, out, q_pos, k_pos, cu_q, cu_k, scale, longest, keys_sorted, interpreted):
    group = q.shape[1] // k.shape[1]
    block_m, block_n, warps, stages = _config(q.shape[-1], q.dtype, interpreted)
    tile_heads = min(group, block_m)
    chunks = -(-group // tile_heads)
    grid = (-(-longest // (block_m // tile_heads)), k.shape[1] * chunks, cu_q.shape[0] - 1)
    _kernel(interpreted)[grid](
        q,
        k,
        v,
        out,
        q_pos,
        k_pos,
        cu_q,
        cu_k,
        scale * math.log2(math.e),
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        TILE_HEADS=tile_heads,
        KEYS_SORTED=keys_sorted,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HEAD_DIM=q.shape[-1],
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=warps,
        num_stages=stages,
    )


def _config(head_dim: int, dtype: torch.dtype, interpreted: bool) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)``; hand-picked, not autotuned.

    One sweep on an H200 (Triton 3.6, fp16, 32/8/128 heads) put (64, 64, 4, 3) about 10% ahead of
    (128, 64, 8, 3) at 16 requests x 8k keys x 20%; not adopted yet: only that case was verified.
    """
    if interpreted:  # few, small programs: the interpreter pays per operation
        return 16, 16, 1, 1
    if dtype == torch.float32 or head_dim > 128:
        return 64, 32, 4, 2
    if head_dim == 128:
        return 128, 64, 8, 3
    return 128, 64, 4, 3


def _check_inputs(q, k, v, q_pos, k_pos, cu_q, cu_k) -> None:
    named = {"q": q, "k": k, "v": v, "q_pos": q_pos, "k_pos": k_pos, "cu_q": cu_q, "cu_k": cu_k}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise InvariantError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    devices = {name: str(t.device) for name, t in named.items()}
    if len(set(devices.values())) > 1:
        raise InvariantError(f"all inputs must be on one device, got {devices}")
    _check_qkv(q, k, v)
    for name, t, n in (("q_pos", q_pos, q.shape[0]), ("k_pos", k_pos, k.shape[0])):
        if t.dtype not in _INDEX_DTYPES or t.shape != (n,):
            raise InvariantError(
                f"{name} must be an int32/int64 vector of length {n}, got {t.dtype} {tuple(t.shape)}"
            )
    for name, t in (("cu_q", cu_q), ("cu_k", cu_k)):
        if t.dtype not in _INDEX_DTYPES or t.dim() != 1 or t.shape[0] < 1:
            raise InvariantError(
                f"{name} must be a non-empty int32/int64 vector, got {t.dtype} {tuple(t.shape)}"
            )
    if cu_q.shape != cu_k.shape:
        raise InvariantError(
            f"cu_q and cu_k must have the same length (B+1), got {cu_q.shape[0]} and {cu_k.shape[0]}"
        )


def _check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise InvariantError(f"{name} must be [tokens, heads, head_dim], got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise InvariantError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise InvariantError(f"q and k must have the same head_dim, got {q.shape[2]} and {k.shape[2]}")
    d = q.shape[2]
    if d < 16 or d > 256 or d & (d - 1):
        raise InvariantError(f"head_dim must be a power of two in [16, 256], got {d}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise InvariantError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})")
    if q.dtype not in _FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise InvariantError(
            f"q, k, v must share one dtype of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}"
        )


def _read_offsets(n_q: int, k_pos: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor) -> tuple[int, bool]:
    """Validate the offsets; ``(longest request's query rows, keys sorted within every request)``.

    One device-to-host copy for the offsets and the sortedness flag together.
    """
    n_k = k_pos.shape[0]
    descent = torch.zeros(n_k + 1, dtype=torch.bool, device=k_pos.device)  # [i]: k_pos[i] < k_pos[i-1]
    descent[1:n_k] = k_pos[1:] < k_pos[:-1]
    descent[cu_k.clamp(0, n_k)] = False  # a request's first key may sit below the previous request's last
    host = torch.cat([cu_q.long(), cu_k.long(), descent.any().long().view(1)]).tolist()
    bounds_q, bounds_k = host[: cu_q.shape[0]], host[cu_q.shape[0] : -1]
    for name, bounds, total in (("cu_q", bounds_q, n_q), ("cu_k", bounds_k, n_k)):
        if (
            bounds[0] != 0
            or bounds[-1] != total
            or any(b < a for a, b in zip(bounds, bounds[1:], strict=False))
        ):
            raise InvariantError(f"{name} must start at 0, never decrease and end at {total}, got {bounds}")
    return max(b - a for a, b in zip(bounds_q, bounds_q[1:], strict=False)) if len(
        bounds_q
    ) > 1 else 0, not host[-1]
