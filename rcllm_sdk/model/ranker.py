"""Build, save, load and fingerprint the ranker: any HF causal LM with rotary positions."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ..errors import ModelLoadError
from ..prompt.template import PromptTemplate, item_token
from .device import resolve_device, resolve_dtype
from .sources import ModelSource, load_model, load_tokenizer, resolve_source
from .support import check_raw_config, check_supported, read_config_json
from .weights import LoadedWeights, digest_of, weight_files

TEMPLATE_FILE = "rcllm_template.json"
TRAINING_FILE = "rcllm_training.json"  # how the SDK trained the model (absent for other checkpoints)
WEIGHTS_FILE = "rcllm_weights.json"  # the weights' digest when the SDK saved them: a load verifies it


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
    version: str = ""  # the MLflow registry version it was loaded from ("" for a folder)
    weights: tuple[LoadedWeights, ...] = ()  # the weight files read at load (base, then adapter)

    def changed_files(self) -> list[Path]:
        """Weight files that changed on disk since they were loaded (the model serves what it loaded)."""
        return [f for w in self.weights for f in w.changed_files()]


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
    (path / WEIGHTS_FILE).write_text(json.dumps({"digest": digest_of(weight_files(path))}))
    ranker.tokenizer.save_pretrained(path)
    (path / TEMPLATE_FILE).write_text(json.dumps(ranker.template.to_dict(), indent=2))
    if training is not None:
        ranker.training = training
        (path / TRAINING_FILE).write_text(json.dumps(training, indent=2, default=str))
    ranker.path, ranker.fingerprint = path, fingerprint(path)
    return path


def load_ranker(
    model: str | Path,
    template: PromptTemplate | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
) -> Ranker:
    """Load a ranker from a local HF causal-LM folder, a PEFT adapter folder (merged into its
    base) or an MLflow URI of either, onto ``device`` in ``dtype`` (``auto``: bfloat16 on CUDA
    where the recipe allows it, float32 otherwise); nothing is downloaded from a hub.

    Raises:
        ModelLoadError: the path is missing or holds no loadable causal LM and tokenizer.
        UnsupportedModelError: the checkpoint is not one the block runner serves (see
            ``rcllm_sdk.model.support``).
        UnsupportedDtypeError: an item-lm ranker asked for in a dtype other than float32.
        DeviceUnavailableError: ``device`` is CUDA on a machine without it.
    """
    source = resolve_source(model)
    config = _checked_config(source.base)
    training = source.read_json(TRAINING_FILE) or {}
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device, training.get("recipe"))
    tokenizer = load_tokenizer(source)
    lm, weights = load_model(source, config, dtype)
    _check_saved_digest(source.base, weights[0].digest)
    lm = lm.to(device)
    if template is None:
        stored = source.read_json(TEMPLATE_FILE)
        template = PromptTemplate(**stored) if stored is not None else PromptTemplate(item_tokens=False)
    folder = source.adapter or source.base
    return Ranker(
        lm,
        tokenizer,
        template,
        source_fingerprint(source, [w.digest for w in weights]),
        folder,
        training,
        source.version,
        tuple(weights),
    )


def _check_saved_digest(folder: Path, loaded: str) -> None:
    """Refuse weights that differ from those the SDK saved in ``folder`` (flipped bytes, a file
    copied over them without the record)."""
    record = folder / WEIGHTS_FILE
    if not record.exists():
        return  # a checkpoint the SDK did not save: nothing to compare with
    try:
        saved = json.loads(record.read_text())["digest"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{record} is not a weights record ({exc})") from exc
    if saved != loaded:
        raise ModelLoadError(
            f"{folder}: the weight files differ from those saved with {WEIGHTS_FILE} (corrupt, or "
            "replaced without it); restore them or save the model again"
        )


def _checked_config(path: Path):
    """The folder's config, refused before any weight is read when the runner cannot serve it."""
    from transformers import AutoConfig

    check_raw_config(path, read_config_json(path))
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers and huggingface_hub raise several types for a bad config
        raise ModelLoadError(f"{path}/config.json is not a valid Hugging Face model config: {exc}") from exc
    check_supported(path, config)
    return config


def source_fingerprint(source: ModelSource, weight_digests: list[str] | None = None) -> str:
    """:func:`fingerprint` of the folder, or for an adapter one over its base's and its own;
    ``weight_digests`` (base first) are those of the weights loaded, else the files are hashed."""
    digests = weight_digests or [None, None]
    if source.adapter is None:
        return fingerprint(source.base, digests[0])
    combined = hashlib.blake2b(digest_size=8)
    combined.update(fingerprint(source.base, digests[0]).encode())
    combined.update(fingerprint(source.adapter, digests[1]).encode())
    return combined.hexdigest()


def fingerprint(path: str | Path, weights_digest: str | None = None) -> str:
    """16 hex digits over the config, tokenizer and SDK files and the full content of the weight
    files (``weights_digest``: their digest as loaded; else hashed here, cached by file stamp)."""
    path = Path(path)
    h = hashlib.blake2b(digest_size=8)
    for f in sorted(path.iterdir()):
        if f.suffix in (".json", ".txt", ".model") and f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    h.update((weights_digest or digest_of(weight_files(path))).encode())
    return h.hexdigest()
