"""What the finetune recipe trains (LoRA adapters through peft, or every weight) and what it
writes: a peft adapter folder over its base, a merged plain folder, or the full weights."""

from __future__ import annotations

from pathlib import Path

import torch

from rcllm_sdk.errors import ConfigError

# Attention and MLP projections: the usual LoRA targets of these architectures (LlamaRec, QLoRA).
LLAMA_STYLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_TARGETS = {family: LLAMA_STYLE for family in ("llama", "qwen2", "qwen3", "mistral")}
MODEL_FILES = ("config.json", "generation_config.json", "adapter_config.json")  # replaced by a new save


def trainable(model: torch.nn.Module, lora: tuple[int, float, float] | None) -> torch.nn.Module:
    """``model`` with LoRA adapters of ``(rank, alpha, dropout)`` on :data:`LORA_TARGETS` (a peft
    model; the base frozen), or ``model`` itself with every weight trainable (``lora`` None)."""
    if lora is None:
        return model.requires_grad_(True)
    from peft import LoraConfig, get_peft_model

    targets = LORA_TARGETS.get(model.config.model_type)
    if targets is None:
        raise ConfigError(
            f"no default LoRA target modules for model_type {model.config.model_type!r}; "
            f"supported: {sorted(LORA_TARGETS)}"
        )
    rank, alpha, dropout = lora
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The ``…ForCausalLM`` inside a peft model (its LoRA layers in place), or ``model`` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def to_save(model: torch.nn.Module, base_model: str, merge: bool, base_version: str = "") -> torch.nn.Module:
    """The module whose ``save_pretrained`` writes the output: the adapters alone (their config
    naming the base, see :func:`base_reference`), the adapters merged into the base, or the full
    model. ``base_version``: the registry version the base was loaded from ("" for a folder)."""
    if not hasattr(model, "get_base_model"):
        return model
    if merge:
        return model.merge_and_unload()
    model.peft_config["default"].base_model_name_or_path = base_reference(base_model, base_version)
    return model


def base_reference(base_model: str, base_version: str = "") -> str:
    """How an adapter folder names its base: a registry URI pinned to the version trained on
    (``models:/name@alias`` becomes ``models:/name/<base_version>``, so moving the alias later
    cannot put the adapter on another base), another MLflow URI as given, a folder as an absolute
    path (so the adapter serves from any working directory)."""
    if base_model.startswith("models:/") and base_version:
        from rcllm_sdk.model.sources import pinned_uri

        return pinned_uri(base_model, base_version)
    if base_model.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        return base_model
    return str(Path(base_model).resolve())


def clear_model_files(folder: Path) -> None:
    """Remove an earlier model's config and weights from ``folder`` so the new save is the only
    model there (an adapter written over full weights would otherwise be ambiguous)."""
    if not folder.is_dir():
        return
    for f in folder.iterdir():
        if f.is_file() and (f.name in MODEL_FILES or f.suffix in (".safetensors", ".bin")):
            f.unlink()
