"""Build, save, load and fingerprint the ranker: any HF causal LM with rotary positions."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ..errors import ModelLoadError
from ..prompt.template import PromptTemplate, item_token

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
TEMPLATE_FILE = "rcllm_template.json"
TRAINING_FILE = "rcllm_training.json"  # how the SDK trained the model (absent for other checkpoints)


@dataclass(slots=True, frozen=True)
class RankerSize:
    """Shape of a ranker built from scratch; ``PRESETS`` names a few."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 384
    max_positions: int = 4096


PRESETS = {
    "micro": RankerSize(64, 2, 2, 1, 128),
    "small": RankerSize(),
    "base": RankerSize(256, 6, 8, 4, 768),
}


@dataclass(slots=True)
class Ranker:
    """A loaded ranker: model, tokenizer, prompt template and a fingerprint of all three."""

    model: torch.nn.Module
    tokenizer: object
    template: PromptTemplate
    fingerprint: str
    path: Path | None = None
    training: dict = field(default_factory=dict)  # TRAINING_FILE's record, e.g. {"block_aware": True, ...}


def build_ranker(
    tokenizer,
    template: PromptTemplate,
    size: RankerSize = RankerSize(),
    item_vectors: dict[int, np.ndarray] | None = None,
    seed: int = 0,
) -> Ranker:
    """A fresh ``LlamaForCausalLM``; item-token embeddings start from ``item_vectors`` when given."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=size.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    if item_vectors:
        _init_item_embeddings(model, tokenizer, item_vectors, seed)
    model.eval()
    return Ranker(model, tokenizer, template, fingerprint="unsaved")


def _init_item_embeddings(model, tokenizer, item_vectors: dict[int, np.ndarray], seed: int) -> None:
    """Project co-occurrence vectors into the embedding space at the embeddings' own scale."""
    emb = model.get_input_embeddings().weight
    dim = len(next(iter(item_vectors.values())))
    gen = torch.Generator().manual_seed(seed)
    projection = torch.linalg.qr(torch.randn(emb.shape[1], dim, generator=gen))[0]  # [hidden, dim]
    ids = [tokenizer.convert_tokens_to_ids(item_token(i)) for i in item_vectors]
    vectors = torch.tensor(np.stack(list(item_vectors.values())), dtype=emb.dtype)  # [n, dim]
    scale = emb.detach().std() * (emb.shape[1] ** 0.5)
    with torch.no_grad():
        emb[ids] = 0.5 * emb[ids] + scale * (vectors @ projection.T)


def save_ranker(ranker: Ranker, path: str | Path, training: dict | None = None) -> Path:
    """Save model, tokenizer and template in Hugging Face format, plus the ``training`` record
    (settings and figures of the run that made it) when given; returns the folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ranker.model.save_pretrained(path)
    ranker.tokenizer.save_pretrained(path)
    (path / TEMPLATE_FILE).write_text(json.dumps(ranker.template.to_dict(), indent=2))
    if training is not None:
        ranker.training = training
        (path / TRAINING_FILE).write_text(json.dumps(training, indent=2, default=str))
    ranker.path, ranker.fingerprint = path, fingerprint(path)
    return path


def load_ranker(model: str | Path, template: PromptTemplate | None = None, dtype=torch.float32) -> Ranker:
    """Load a local HF causal-LM folder or an MLflow model/artifact URI; nothing is downloaded from a hub.

    Raises:
        ModelLoadError: the path is missing, or holds no causal LM with rotary positions, or an item-lm
            ranker is asked for in a dtype other than float32.
    """
    path = _resolve(str(model))
    config = _checked_config(path)
    training_file = path / TRAINING_FILE
    training = json.loads(training_file.read_text()) if training_file.exists() else {}
    if training.get("recipe") == "item-lm" and dtype != torch.float32:
        # Its compiled lookup adds scores of order 1 to constants of order 1e3 (item_lm_ranker.py):
        # measured on CPU, bf16 keeps the float32 top item for 70% of users, fp16 for 66%.
        raise ModelLoadError(f"{path}: an item-lm ranker's compiled label lookup needs float32, got {dtype}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        lm = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, local_files_only=True, attn_implementation="sdpa"
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: could not load a causal LM and tokenizer ({exc})") from exc
    lm.eval()
    template_file = path / TEMPLATE_FILE
    if template is None:
        template = (
            PromptTemplate(**json.loads(template_file.read_text()))
            if template_file.exists()
            else PromptTemplate(item_tokens=False)
        )
    return Ranker(lm, tokenizer, template, fingerprint(path), path, training)


def _resolve(model: str) -> Path:
    if model.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        import mlflow  # lazy: heavy, only needed for URIs

        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model))
        except Exception as exc:  # mlflow raises several types for a bad URI
            raise ModelLoadError(f"could not fetch MLflow artifact {model!r}: {exc}") from exc
        return local / "model" if (local / "model" / "config.json").exists() else local
    path = Path(model)
    if not (path / "config.json").exists():
        raise ModelLoadError(
            f"{path} holds no config.json: pass a Hugging Face model folder "
            "(save_pretrained output) or an MLflow URI such as runs:/<run_id>/model"
        )
    return path


def _checked_config(path: Path):
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}/config.json is not a Hugging Face model config: {exc}") from exc
    if config.model_type not in SUPPORTED_FAMILIES:
        raise ModelLoadError(
            f"{path}: model_type {config.model_type!r} is not supported; "
            f"use a rotary causal LM of the families {SUPPORTED_FAMILIES}"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None)
    if not rope:
        raise ModelLoadError(f"{path}: config has no rotary position settings (rope_parameters/rope_theta)")
    return config


def fingerprint(path: str | Path) -> str:
    """16 hex digits over config, tokenizer files and the weight files.

    Weight files up to 256 MiB are hashed whole; larger ones by size plus 1 MiB every 16 MiB,
    so multi-GB checkpoints hash in well under a second (a fine-tune touches every tensor, so
    the samples change; a change confined between samples would not be seen).
    """
    h = hashlib.blake2b(digest_size=8)
    for f in sorted(Path(path).iterdir()):
        if f.suffix in (".json", ".txt", ".model") and f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
        elif f.suffix in (".safetensors", ".bin"):
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            _hash_weights(h, f)
    return h.hexdigest()


def _hash_weights(h, file: Path, whole_limit: int = 256 << 20, stride: int = 16 << 20) -> None:
    size = file.stat().st_size
    with file.open("rb") as fh:
        if size <= whole_limit:
            h.update(fh.read())
            return
        for offset in range(0, size, stride):
            fh.seek(offset)
            h.update(fh.read(1 << 20))
