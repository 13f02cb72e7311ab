"""Where a ranker's files come from: a local Hugging Face folder, a PEFT adapter folder over its
base, or an MLflow URI holding either; and how tokenizer and weights are read from them.

Nothing is downloaded from a hub: an adapter's ``base_model_name_or_path`` must be a local folder
(as written, or relative to the adapter folder) or an MLflow URI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelLoadError
from .weights import FileStamp, LoadedWeights, digest_of, read_weights, weight_files

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")
ADAPTER_CONFIG = "adapter_config.json"
GENERIC_TOKENIZER_CLASSES = (None, "TokenizersBackend", "PreTrainedTokenizerFast")


@dataclass(slots=True, frozen=True)
class ModelSource:
    """A checkpoint resolved to local folders.

    Attributes:
        base: the folder holding ``config.json`` and the weights.
        adapter: a PEFT adapter folder loaded over ``base`` and merged (None: a plain folder).
        version: the MLflow registry version it was loaded from ("" otherwise).
    """

    base: Path
    adapter: Path | None = None
    version: str = ""

    @property
    def folders(self) -> tuple[Path, ...]:
        """Where the SDK's own files (template, training record, tokenizer) are looked for, first first."""
        return (self.adapter, self.base) if self.adapter else (self.base,)

    def read_json(self, name: str) -> dict | None:
        """The first ``name`` found in :attr:`folders`, parsed (None when absent)."""
        for folder in self.folders:
            if (folder / name).exists():
                return read_json_file(folder / name)
        return None


def read_json_file(path: Path) -> dict:
    """A JSON object file of a model folder; a truncated or garbled one is a ModelLoadError naming it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(
            f"{path} is not a readable JSON file ({exc}); restore it or save the model again"
        ) from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def resolve_source(model: str | Path) -> ModelSource:
    """Local folders of ``model``: a Hugging Face folder, a PEFT adapter folder, or an MLflow URI
    (``runs:/<id>/model``, ``models:/<name>/<version>``, ``models:/<name>@<alias>``) of either."""
    model, version = str(model), ""
    if model.startswith("models:/"):
        version = registry_version(model)
        model = pinned_uri(model, version)
    folder = _download(model) if model.startswith(MLFLOW_SCHEMES) else Path(model)
    if (folder / ADAPTER_CONFIG).exists():
        return ModelSource(_adapter_base(folder), folder, version)
    if not (folder / "config.json").exists():
        raise ModelLoadError(
            f"{folder} holds no config.json or {ADAPTER_CONFIG}: pass a Hugging Face model folder "
            "(save_pretrained output), a PEFT adapter folder, or an MLflow URI such as runs:/<run_id>/model"
        )
    return ModelSource(folder, None, version)


def registry_version(uri: str) -> str:
    """The registry version a ``models:/name@alias``, ``models:/name/<version>`` or
    ``models:/name/latest`` URI names now."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    ref = uri.removeprefix("models:/").strip("/")
    name, _, alias = ref.partition("@")
    name, _, pinned = name.partition("/")
    try:
        client = MlflowClient()
        if alias:
            return str(client.get_model_version_by_alias(name, alias).version)
        if pinned.isdigit():
            return pinned
        versions = client.search_model_versions(f"name = '{name}'")
        stage = None if pinned in ("", "latest") else pinned.lower()
        chosen = [v for v in versions if stage is None or (v.current_stage or "").lower() == stage]
        return str(max(int(v.version) for v in chosen))
    except (MlflowException, ValueError) as exc:
        raise ModelLoadError(f"MLflow registry has no model version for {uri!r}: {exc}") from exc


def pinned_uri(uri: str, version: str) -> str:
    """``models:/<name>/<version>``: the version the alias named when it was resolved."""
    name = uri.removeprefix("models:/").strip("/").partition("@")[0].partition("/")[0]
    return f"models:/{name}/{version}"


def _download(uri: str) -> Path:
    import mlflow  # lazy: heavy, only needed for URIs

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as exc:  # mlflow raises several types for a bad URI
        raise ModelLoadError(f"could not fetch MLflow artifact {uri!r}: {exc}") from exc
    nested = local / "model"
    holds_model = (nested / "config.json").exists() or (nested / ADAPTER_CONFIG).exists()
    return nested if holds_model else local


def _adapter_base(adapter: Path) -> Path:
    """The local base folder of a PEFT adapter (never itself an adapter)."""
    base = read_json_file(adapter / ADAPTER_CONFIG).get("base_model_name_or_path") or ""
    if base.startswith(MLFLOW_SCHEMES):
        source = resolve_source(base)
    else:
        candidates = [Path(base), adapter / base]
        found = next((p for p in candidates if base and (p / "config.json").exists()), None)
        if found is None:
            raise ModelLoadError(
                f"{adapter}: its base_model_name_or_path {base!r} is not a local model folder or an MLflow "
                f"URI (nothing is downloaded from a hub); put the base checkpoint on disk and set "
                f"base_model_name_or_path in {ADAPTER_CONFIG} to its folder"
            )
        source = ModelSource(found)
    if source.adapter is not None:
        raise ModelLoadError(f"{adapter}: its base {base!r} is itself an adapter; merge that one first")
    return source.base


def load_tokenizer(source: ModelSource):
    """The tokenizer saved with the checkpoint (the adapter folder's when it has one).

    A ``tokenizer.json`` saved by a generic class is read as saved: ``AutoTokenizer`` would
    rebuild some families' pipelines (Qwen2) from the vocabulary and drop a SentencePiece-style
    pre-tokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = next((f for f in source.folders if (f / "tokenizer_config.json").exists()), source.base)
    config_file = folder / "tokenizer_config.json"
    declared = read_json_file(config_file).get("tokenizer_class") if config_file.exists() else None
    try:
        if (folder / "tokenizer.json").exists() and declared in GENERIC_TOKENIZER_CLASSES:
            return PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder}: could not load a tokenizer ({exc})") from exc


def load_model(
    source: ModelSource, config, dtype: torch.dtype
) -> tuple[torch.nn.Module, list[LoadedWeights]]:
    """The causal LM of ``source`` in ``dtype`` on the CPU, an adapter merged into its base, and
    what identifies the weights of each folder read, base first (see :mod:`rcllm_sdk.model.weights`)."""
    model, base = _load_weights(source.base, config, dtype)
    if source.adapter is None:
        return model.eval(), [base]
    model, adapter = _merge_checked(model, source.adapter)
    return model.eval(), [base, adapter]


def _load_weights(folder: Path, config, dtype: torch.dtype) -> tuple[torch.nn.Module, LoadedWeights]:
    """A Hugging Face folder's causal LM, built from the very bytes :func:`read_weights` hashed
    (the one place weights are read); a config its weights do not fit is refused."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    weights = read_weights(folder)
    try:
        model, info = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(
            None,
            config=config,
            state_dict=weights.tensors,
            dtype=dtype,
            attn_implementation="sdpa",
            output_loading_info=True,
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"{folder}: could not load the causal LM's weights ({exc})") from exc
    unfit = {
        kind: sorted(info[kind])[:3]
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
        if info[kind]
    }
    if unfit:
        raise ModelLoadError(
            f"{folder}/config.json does not match its weights ({unfit}): the config was edited or the "
            "weights belong to another model"
        )
    return model, weights.identity()


def _merge_checked(model: torch.nn.Module, adapter: Path) -> tuple[torch.nn.Module, LoadedWeights]:
    """:func:`merge_adapter`, refusing adapter files that changed while peft read them."""
    files = weight_files(adapter)
    stamps = tuple(FileStamp.of(f) for f in files)
    digest = digest_of(files)
    merged = merge_adapter(model, adapter)
    if tuple(FileStamp.of(f) for f in files) != stamps:
        raise ModelLoadError(f"{adapter}: the adapter's weights changed while they were read; load it again")
    return merged, LoadedWeights(digest, stamps)


def merge_adapter(model: torch.nn.Module, adapter: Path) -> torch.nn.Module:
    """``model`` with the PEFT adapter in ``adapter`` merged into its weights (a plain model)."""
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise ModelLoadError(f"{adapter} is a PEFT adapter: loading it needs the peft package") from exc
    try:
        return PeftModel.from_pretrained(model, adapter, is_trainable=False).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"{adapter}: could not apply the adapter to its base ({exc})") from exc
