"""Stored block KV: layout, a self-describing header row, validation.

A block's KV is stored as ``[2, layers, T + 1, kv_heads * head_dim]`` (LMCache's KV_2LTD):
the T token rows plus one header row. The header holds the block's 64-bit content hash
(which covers the model fingerprint, block kind and token ids) and T, as small integers
that every float dtype represents exactly. A value whose shape, dtype or header does not
match what the prompt needs is never used: it counts as a miss and is recomputed.
"""

from __future__ import annotations

import torch

from ..errors import InvariantError

HEADER_BYTES = 12  # 8 bytes of content hash + 4 bytes of token count


def _header_values(content_hash: int, tokens: int) -> list[int]:
    return list(content_hash.to_bytes(8, "little")) + list(tokens.to_bytes(4, "little"))


def pack(kv: torch.Tensor, content_hash: int) -> torch.Tensor:
    """``[2, L, T, H, D]`` block KV -> contiguous ``[2, L, T + 1, H*D]`` with the header row."""
    two, layers, tokens, heads, dim = kv.shape
    kv = kv.cpu()
    if heads * dim < HEADER_BYTES:
        raise InvariantError(f"kv width {heads * dim} is too small for the {HEADER_BYTES}-value header")
    out = torch.zeros(two, layers, tokens + 1, heads * dim, dtype=kv.dtype)
    out[:, :, :tokens] = kv.reshape(two, layers, tokens, heads * dim)
    out[0, 0, tokens, :HEADER_BYTES] = torch.tensor(_header_values(content_hash, tokens), dtype=kv.dtype)
    return out


def unpack(
    stored: torch.Tensor | None,
    content_hash: int,
    tokens: int,
    layers: int,
    heads: int,
    dim: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """The ``[2, L, T, H, D]`` block KV if ``stored`` is exactly the block asked for, else None."""
    if stored is None or stored.dtype != dtype or tuple(stored.shape) != (2, layers, tokens + 1, heads * dim):
        return None
    header = stored[0, 0, tokens, :HEADER_BYTES].tolist()
    if header != [float(v) for v in _header_values(content_hash, tokens)]:
        return None
    return stored[:, :, :tokens].view(2, layers, tokens, heads, dim)
