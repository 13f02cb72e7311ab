"""Where the finetune recipe trains and in which precision: CPU in float32, CUDA with bf16 or
fp16 autocast (Accelerate's ``mixed_precision``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rcllm_sdk.errors import ConfigError
from rcllm_sdk.model.device import resolve_device

MIXED = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}


@dataclass(slots=True, frozen=True)
class Precision:
    """``cpu``: train on the CPU; ``mixed``: Accelerate's mixed precision (``no``, ``bf16``,
    ``fp16``); ``weights``: the dtype the base model's weights are loaded in."""

    cpu: bool
    mixed: str
    weights: torch.dtype


def choose_precision(device: str, dtype: str, full: bool) -> Precision:
    """The precision of ``device`` (``auto``, ``cpu``, ``cuda``) and ``dtype`` (``auto``,
    ``float32``, ``bfloat16``, ``float16``).

    ``auto`` is CUDA when torch sees one, with bf16 autocast where the GPU supports it. LoRA loads
    the frozen base weights in the autocast dtype (half the memory; the adapters stay float32);
    full fine-tuning keeps float32 master weights. The CPU trains in float32 only.

    Raises:
        DeviceUnavailableError: CUDA asked for where there is none.
        ConfigError: a half dtype asked for on the CPU, or a ``cuda:N`` device.
    """
    if ":" in device:
        raise ConfigError(
            f"--device {device}: training takes every GPU it is given; choose one with "
            "CUDA_VISIBLE_DEVICES and --device cuda, or several with accelerate launch"
        )
    if resolve_device(device).type == "cpu":
        if dtype not in ("auto", "float32"):
            raise ConfigError(f"training on the CPU runs in float32; {dtype} autocast needs --device cuda")
        return Precision(True, "no", torch.float32)
    if dtype == "auto":
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    mixed = MIXED[dtype]
    weights = torch.float32 if full or mixed == "no" else getattr(torch, dtype)
    return Precision(False, mixed, weights)


def accelerator_for(precision: Precision):
    """An ``accelerate.Accelerator`` for ``precision`` (device placement, autocast, DDP under
    ``accelerate launch``). Accelerate keeps one mixed-precision setting per process and refuses
    another; it is cleared first so one process can fine-tune in float32, then in bf16 (notebooks)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # private (accelerate pinned in constraints.txt); keeps the process group
    return Accelerator(cpu=precision.cpu, mixed_precision=precision.mixed)
