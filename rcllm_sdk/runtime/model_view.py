"""The pieces of a Hugging Face decoder the runner drives by hand.

Llama, Mistral, Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm) share one layout:
``model.model.{embed_tokens, layers, norm, rotary_emb}`` and per layer
``input_layernorm, self_attn.{q,k,v,o}_proj[, q_norm, k_norm], post_attention_layernorm, mlp``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ModelLoadError
from ..model.support import active_sliding_window


@dataclass(slots=True, frozen=True)
class ModelView:
    """Shapes and modules of one loaded causal LM."""

    model: torch.nn.Module
    layers: tuple
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    tables: dict = field(default_factory=dict, compare=False)  # rotary tables by (dtype, device)

    @property
    def kv_width(self) -> int:
        """Width of one token's K (or V) in one layer: ``kv_heads * head_dim``."""
        return self.n_kv_heads * self.head_dim

    @property
    def base(self):
        return self.model.base_model

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelView:
        base, config = model.base_model, model.config
        missing = [
            name for name in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(base, name)
        ]
        if missing:
            raise ModelLoadError(
                f"{type(model).__name__} lacks {missing}: the runner drives Llama-style decoders "
                "(llama, mistral, qwen2, qwen3)"
            )
        window = active_sliding_window(config)
        if window:
            raise ModelLoadError(
                f"sliding-window attention (window {window}) is not supported by the block runner"
            )
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            model,
            tuple(base.layers),
            len(base.layers),
            heads,
            getattr(config, "num_key_value_heads", None) or heads,
            head_dim,
            next(model.parameters()).dtype,
            next(model.parameters()).device,
        )

    def rope(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's own ``cos, sin`` for ``positions [n]``: ``[n, 1, head_dim]`` each, read from
        a table the model's rotary module computed for positions ``0..size-1`` (each entry depends
        on its own position only, so it equals computing the positions directly)."""
        cos, sin = self._rope_table(int(positions.max()) + 1 if len(positions) else 1, like)
        return cos[positions][:, None, :], sin[positions][:, None, :]

    def _rope_table(self, needed: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (like.dtype, str(like.device))
        table = self.tables.get(key)
        if table is None or table[0].shape[0] < needed:
            size = max(1024, 2 * needed)
            cos, sin = self.base.rotary_emb(like, torch.arange(size, device=like.device)[None, :])
            table = (cos[0], sin[0])  # [size, head_dim] each
            self.tables[key] = table  # one assignment: a concurrent reader sees the old or the new table
        return table


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [n, heads, head_dim]`` (HF's half-split convention)."""
    return x * cos + rotate_half(x) * sin


def shift_keys(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move keys rotated at position p to position p + delta (per token).

    RoPE rotations compose per frequency, R(p + d) = R(d) R(p), so this is exact up to float
    error. ``keys [..., T, heads, head_dim]`` (any leading dims), ``delta [T]``. The rotation is
    built from ``inv_freq`` alone (without the model's attention scaling, which the stored keys
    already carry once).
    """
    angles = delta.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]  # [T, D/2], exact angles
    emb = torch.cat((angles, angles), dim=-1)[:, None, :]  # [T, 1, D]
    cos, sin = emb.cos().to(keys.dtype), emb.sin().to(keys.dtype)
    return keys * cos + rotate_half(keys) * sin


class RopeTable:
    """``cos, sin`` of whole-position shifts ``0..n`` (``[n+1, head_dim]``, from float64 angles as
    :func:`shift_keys`), built once per dtype and device and grown when a larger shift comes."""

    def __init__(self, inv_freq: torch.Tensor):
        self.inv_freq = inv_freq
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def rotate(self, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``keys [..., T, heads, head_dim]`` rotated by ``delta [T]`` (non-negative ints) positions."""
        cos, sin = self._table(int(delta.max()) if len(delta) else 0, keys.dtype, keys.device)
        cos, sin = cos[delta][:, None, :], sin[delta][:, None, :]  # [T, 1, head_dim]
        return keys * cos + rotate_half(keys) * sin

    def _table(self, largest: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (dtype, str(device))
        table = self._tables.get(key)
        if table is None or table[0].shape[0] <= largest:
            size = max(1024, 2 * largest + 1)
            angles = torch.arange(size, dtype=torch.float64)[:, None] * self.inv_freq.double().cpu()[None, :]
            emb = torch.cat((angles, angles), dim=-1)  # [size, head_dim]
            table = (emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype))
            self._tables[key] = table  # one assignment: a concurrent reader sees the old or the new table
        return table
