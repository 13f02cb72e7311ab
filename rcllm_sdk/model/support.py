"""Which checkpoints the block runner can serve, checked before any weight is read.

Supported: decoder-only causal LMs of the rotary families below, with a RoPE whose frequencies
do not depend on the sequence (``rope_type`` ``default``, ``linear``, ``llama3``, ``yarn``:
a cached key moves to a new position by a pure rotation of its frequencies, and yarn's
attention factor, applied once when the key was computed, is kept), full causal attention at
every prompt length the model accepts, and code that ships with ``transformers``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelLoadError, UnsupportedModelError

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
SUPPORTED = (
    f"supported: {'/'.join(SUPPORTED_FAMILIES)} causal LMs (…ForCausalLM) with rope_type "
    f"{'/'.join(SUPPORTED_ROPE_TYPES)}, without active sliding-window attention or remote code"
)


def read_config_json(path: Path) -> dict:
    """The raw ``config.json`` of a checkpoint folder."""
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}/config.json is not a Hugging Face model config: {exc}") from exc


def check_raw_config(path: Path, raw: dict) -> None:
    """Refuse, before ``transformers`` reads it, a config that needs code from outside it."""
    if raw.get("auto_map"):
        raise UnsupportedModelError(
            f"{path}: the checkpoint needs trust_remote_code (its config has auto_map "
            f"{sorted(raw['auto_map'])}); remote code is never run. {SUPPORTED}"
        )


def check_supported(path: Path, config) -> None:
    """Raise :class:`ModelLoadError` naming what is supported when the runner cannot serve ``config``."""
    if config.model_type not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(f"{path}: model_type {config.model_type!r} is not supported; {SUPPORTED}")
    architectures = getattr(config, "architectures", None) or []
    if any(not name.endswith("ForCausalLM") for name in architectures):
        raise UnsupportedModelError(f"{path}: {architectures} is not a causal LM head; {SUPPORTED}")
    rope_type = rope_type_of(config)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"{path}: rope_type {rope_type!r} changes the rotary frequencies with the sequence, so "
            f"cached keys cannot be re-positioned by a rotation; {SUPPORTED}"
        )
    window = active_sliding_window(config)
    if window:
        raise UnsupportedModelError(
            f"{path}: sliding-window attention (window {window} < {config.max_position_embeddings} "
            f"positions) is not supported by the block runner; {SUPPORTED}"
        )


def rope_type_of(config) -> str:
    """The config's ``rope_type`` (``default`` when unscaled)."""
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or not rope:
        raise UnsupportedModelError(f"{config.model_type} config has no rotary settings; {SUPPORTED}")
    if "rope_type" not in rope and all(isinstance(v, dict) for v in rope.values()):
        return "per-layer " + "/".join(sorted({v.get("rope_type", "default") for v in rope.values()}))
    return rope.get("rope_type") or rope.get("type") or "default"


def active_sliding_window(config) -> int | None:
    """The window of sliding-window attention that can take effect, else None.

    A window takes effect when some layer uses it (Qwen2/Qwen3: ``use_sliding_window`` with
    ``layer_types``; Mistral: any ``sliding_window``) and it is shorter than the longest
    sequence the model accepts (``max_position_embeddings``): a Mistral v0.1 (4096 of 32768) is
    refused, a Mistral v0.3 (``sliding_window: null``) is not, nor a Qwen2 whose
    ``sliding_window`` field is set with ``use_sliding_window: false``.
    """
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    limit = getattr(config, "max_position_embeddings", None)
    return window if limit is None or window < limit else None
