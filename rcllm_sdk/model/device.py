"""Where and in which precision a ranker runs: ``device`` and ``dtype`` settings to torch objects.

``device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when present, else CPU).
``dtype``: ``auto`` (bfloat16 on CUDA where the recipe allows it, float32 otherwise),
``float32``, ``bfloat16`` or ``float16``. An item-lm ranker runs in float32 only: its compiled
label lookup adds scores of order 1 to constants of order 1e3 (``pipelines/item_lm``).
"""

from __future__ import annotations

import torch

from ..config import DEVICE_PATTERN, DTYPES
from ..errors import ConfigError, DeviceUnavailableError, UnsupportedDtypeError

FLOAT32_ONLY_RECIPES = ("item-lm",)


def resolve_device(name: str | torch.device) -> torch.device:
    """The torch device of a ``device`` setting; :class:`DeviceUnavailableError` when CUDA is asked for
    but this machine (or this torch build) has none, or has fewer GPUs than the index."""
    if isinstance(name, torch.device):
        name = str(name)
    if not DEVICE_PATTERN.match(name):
        raise ConfigError(f"device {name!r}: use cpu, cuda, cuda:N or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"device {name!r} asked for, but CUDA is not available on this machine "
                f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); use device='cpu'"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise DeviceUnavailableError(f"device {name!r}: this machine has {count} CUDA device(s)")
    return device


def resolve_dtype(name: str | torch.dtype, device: torch.device, recipe: str | None = None) -> torch.dtype:
    """The torch dtype of a ``dtype`` setting for a ranker trained by ``recipe`` on ``device``;
    :class:`UnsupportedDtypeError` when the recipe cannot serve that dtype."""
    if isinstance(name, torch.dtype):
        dtype = name
    elif name == "auto":
        half_ok = device.type == "cuda" and recipe not in FLOAT32_ONLY_RECIPES
        dtype = torch.bfloat16 if half_ok else torch.float32
    elif name in DTYPES:
        dtype = getattr(torch, name)
    else:
        raise ConfigError(f"dtype {name!r}: use one of {DTYPES}")
    if recipe in FLOAT32_ONLY_RECIPES and dtype != torch.float32:
        # Measured on CPU: bf16 keeps the float32 top item for 70% of users, fp16 for 66%.
        raise UnsupportedDtypeError(
            f"an {recipe} ranker's compiled label lookup needs float32, got {dtype}; "
            "use dtype='float32' or 'auto'"
        )
    return dtype


def check_placement(model: torch.nn.Module, device: str, dtype: str, recipe: str | None = None) -> None:
    """Raise :class:`ConfigError` when ``model`` is not on the ``device`` in the ``dtype`` the
    settings ask for (a recommender shares its loaded model; moving it is a new load)."""
    param = next(model.parameters())
    want_device = resolve_device(device)
    want_dtype = resolve_dtype(dtype, want_device, recipe)
    same_device = param.device.type == want_device.type and (
        want_device.index is None or param.device.index == want_device.index
    )
    if not same_device or param.dtype != want_dtype:
        raise ConfigError(
            f"the ranker is loaded on {param.device} in {param.dtype}, the settings ask {device}/{dtype}: "
            "load it again with from_feature_store(..., device=..., dtype=...)"
        )
