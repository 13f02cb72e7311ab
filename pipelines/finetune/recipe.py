"""``rcllm train --base-model``: fine-tune a pretrained checkpoint on the verbalizer objective.

The objective is the verbalizer recipe's: cross-entropy over the candidates' label-token logits
at the prompt's last position, the target the true next item's label, on prompts encoded by the
serving encoder (:class:`~rcllm_sdk.prompt.PromptEncoder`) from the same cross-fitted retriever
candidates. The output folder serves as it is: ``RcRecommender.from_feature_store(model=out)``.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from rcllm_sdk.errors import ConfigError, TrainingDataError
from rcllm_sdk.model.ranker import Ranker, load_ranker, save_ranker
from rcllm_sdk.model.tokenizer import label_token_ids
from rcllm_sdk.prompt import ItemInfo, PromptTemplate
from rcllm_sdk.retrieval import Retriever

from ..examples import BlockEncoder, build_examples
from ..train_config import TrainConfig
from .adapters import causal_lm, clear_model_files, to_save, trainable, trainable_count
from .checkpoint import CHECKPOINT_DIR
from .loop import Batches, fit
from .precision import accelerator_for, choose_precision

# Settings a checkpoint must share with the run that resumes it (the rest may change: steps, device).
RESUME_KEYS = ("base_model", "lora", "full", "batch_size", "grad_accum", "candidates", "seed", "lr")


def finetune_ranker(
    groups: list[tuple[list[list[int]], Retriever]],
    catalog: dict[int, ItemInfo],
    out_dir: str | Path,
    config: TrainConfig,
    template: PromptTemplate | None = None,
    progress: bool = True,
) -> tuple[Ranker, dict]:
    """Fine-tune ``config.finetune.base_model`` and save the result to ``out_dir``.

    ``template`` defaults to ``config.template`` (YAML), else the base's own
    (``rcllm_template.json``) or, for a foreign checkpoint, ``PromptTemplate(item_tokens=False)``.
    Returns the saved ranker and the training record (examples, per-step ``step_losses``,
    ``final_loss``, seconds, parameters, settings).

    Raises:
        TrainingDataError: the retriever never put a true next item among the candidates.
        LabelTokenError: a label is not one distinct token of the base's tokenizer.
        ConfigError: a bad setting (e.g. more candidates than the template has labels).
        DeviceUnavailableError: CUDA asked for on a machine without it.
    """
    started, out_dir, settings = time.perf_counter(), Path(out_dir), config.finetune
    precision = choose_precision(settings.device, settings.dtype, settings.full)
    accelerator = accelerator_for(precision)
    base = _base(config, template, precision.weights)
    labels = _label_ids(base, config.candidates)
    examples, stats = _examples(groups, config)
    torch.manual_seed(config.seed)  # the LoRA initialisation
    model = trainable(base.model, settings.lora_spec())
    encoder = BlockEncoder(catalog, base.template, base.tokenizer)
    batches = Batches(examples, encoder, base.tokenizer.pad_token_id, config, accelerator.process_index)
    record = config.record()
    resume_settings = {k: record[k] for k in RESUME_KEYS}
    lm = _prepared_lm(model, settings.gradient_checkpointing)
    losses = fit(model, lm, batches, labels, accelerator, out_dir / CHECKPOINT_DIR, resume_settings, progress)
    lm.config.use_cache = True
    summary = {**stats, **_figures(losses, started, model, precision, settings), **record}
    ranker = _save(accelerator, model, base, out_dir, summary, settings)
    if not accelerator.is_main_process:  # under accelerate launch: only the main process goes on to
        raise SystemExit(0)  # log the MLflow run and register the model version
    return ranker, summary


def _examples(groups, config: TrainConfig) -> tuple[list, dict]:
    examples, stats = build_examples(
        groups, config.candidates, max_examples=config.max_examples, seed=config.seed
    )
    if not examples:
        raise TrainingDataError(
            "no training examples: the retriever never ranked a true next item in its top-K"
        )
    return examples, stats


def _figures(losses: list[float], started: float, model, precision, settings) -> dict:
    """The run's figures for the training record (every step's loss included)."""
    return {
        "final_loss": float(np.mean(losses[-20:])),
        "step_losses": losses,
        "train_seconds": time.perf_counter() - started,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": trainable_count(model),
        "output": "full" if settings.full else ("merged" if settings.merge else "adapter"),
        "mixed_precision": precision.mixed,
    }


def _base(config: TrainConfig, template: PromptTemplate | None, dtype) -> Ranker:
    """The base checkpoint on the CPU (Accelerate places it) with the prompt template to train on."""
    if template is None and config.template:
        from rcllm_sdk.prompt.template_file import load_template

        template = load_template(config.template)
    base = load_ranker(config.finetune.base_model, template, dtype=dtype)
    if template is None and config.item_text_words:
        base.template = replace(base.template, item_text_words=config.item_text_words)
    return base


def _label_ids(base: Ranker, candidates: int) -> list[int]:
    labels = base.template.labels[:candidates]
    if len(labels) < candidates:
        raise ConfigError(f"{candidates} candidates but the template has {len(labels)} labels")
    return label_token_ids(base.tokenizer, labels, base.template.label_format)


def _prepared_lm(model, gradient_checkpointing: bool):
    """The causal LM inside ``model``, set for training (no KV cache; checkpointed layers if asked)."""
    lm = causal_lm(model)
    lm.config.use_cache = False
    if gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return lm


def _save(accelerator, model, base: Ranker, out_dir: Path, summary: dict, settings) -> Ranker:
    """Write the output folder on the main process; remove the checkpoint once the model is saved."""
    accelerator.wait_for_everyone()
    saved = to_save(model, settings.base_model, settings.merge, base.version)
    result = Ranker(saved, base.tokenizer, base.template, "")
    if accelerator.is_main_process:
        clear_model_files(out_dir)
        save_ranker(result, out_dir, training=summary)
        shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)
    accelerator.wait_for_everyone()
    return result
