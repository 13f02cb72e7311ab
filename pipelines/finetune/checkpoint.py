"""Resumable training state of the finetune recipe: ``<out>/checkpoint/`` holds the trainable
weights, optimiser and schedule state, the step and the losses so far.

Batches and dropout are seeded per step (``loop.py``), so a resumed run continues exactly as the
uninterrupted run would have. The folder is replaced atomically (written beside, then renamed),
so a crash while saving leaves the previous checkpoint whole.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rcllm_sdk.errors import ConfigError

CHECKPOINT_DIR = "checkpoint"
WEIGHTS_FILE = "trainable.safetensors"
STATE_FILE = "state.pt"


def save_checkpoint(folder: Path, model, optimizer, schedule, losses: list[float], settings: dict) -> None:
    """Write the state after ``len(losses)`` steps of ``model`` (its trainable weights only)."""
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(weights, staging / WEIGHTS_FILE)
    state = {
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "losses": losses,
        "settings": settings,
    }
    torch.save(state, staging / STATE_FILE)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def load_checkpoint(folder: Path, model, optimizer, schedule, settings: dict) -> list[float]:
    """Restore the state saved in ``folder``; returns the losses of the steps already done.

    Raises:
        ConfigError: the checkpoint was written by a run with other model settings.
    """
    state = torch.load(folder / STATE_FILE, weights_only=True)
    if state["settings"] != settings:
        changed = sorted(k for k in settings if state["settings"].get(k) != settings[k])
        raise ConfigError(
            f"{folder} was written with other settings ({', '.join(changed)}); resume with the same "
            "base model, LoRA/full, batch and seed settings, or train without --resume"
        )
    weights = load_file(folder / WEIGHTS_FILE)
    missing = {n for n, p in model.named_parameters() if p.requires_grad} - set(weights)
    if missing:
        raise ConfigError(f"{folder} lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]})")
    model.load_state_dict(weights, strict=False)
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    return list(state["losses"])
