"""``rcllm train --recipe item-lm``: item LM, readout, compiled lookup, checks, save."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaForCausalLM

from rcllm_sdk.errors import ConfigError, TrainingDataError
from rcllm_sdk.model.ranker import Ranker, save_ranker
from rcllm_sdk.model.tokenizer import label_token_ids, train_tokenizer
from rcllm_sdk.prompt import ItemInfo, PromptEncoder, PromptTemplate, item_token
from rcllm_sdk.retrieval import Retriever

from ..examples import BlockEncoder, build_examples
from ..train import tokenizer_corpus
from .compile import compile_ranker, compiled_agreement
from .fitting import item_lm_config, train_item_lm
from .readout import candidate_scores, fit_readout, score_basis
from .windows import UserBlockWindows, item_lm_template


def train_item_lm_ranker(
    groups: list[tuple[list[list[int]], Retriever]],
    catalog: dict[int, ItemInfo],
    out_dir: str | Path,
    config,
    template: PromptTemplate | None = None,
    progress: bool = True,
) -> tuple[Ranker, dict]:
    """``rcllm train --recipe item-lm``: train the item LM on every training sequence, fit the readout
    on the cross-fitted examples, compile, check the compiled model against the readout on held-out
    examples, and save (HF format, like any ranker). Returns the ranker and a summary."""
    started = time.perf_counter()
    if config.size is None or config.item_lm.features == "auto":
        config = config.for_catalog(sum(len(s) for g, _ in groups for s in g), len(catalog))
    content = config.item_lm.features == "content"
    template = template or item_lm_template(item_text_words=config.item_text_words, relation_markers=content)
    if (
        template.relation_markers != content
    ):  # the id item LM's windows carry no markers; the content one needs them
        raise ConfigError(
            "relation markers in the template go with item_features='content', and only with it"
        )
    tokenizer = train_tokenizer(
        tokenizer_corpus(catalog, template), catalog.keys(), template, config.vocab_size
    )
    windows = UserBlockWindows(catalog, template, tokenizer)
    _check_labels_unused(windows, tokenizer, template, config.candidates)
    sequences = [seq for group, _ in groups for seq in group]
    if content:
        base, losses, stopping = _train_content_item_lm(sequences, catalog, windows, config, progress)
    else:
        base, losses, stopping = train_item_lm(sequences, windows, config, progress)
    examples, stats = build_examples(
        groups, config.candidates, max_examples=config.max_examples, seed=config.seed
    )
    examples = [e for e in examples if len(e.candidates) == config.candidates]  # the readout has K positions
    if len(examples) < 2:
        raise TrainingDataError(
            "fewer than two training examples: the retriever never ranked a true next item in its top-K"
        )
    encoder = BlockEncoder(catalog, template, tokenizer)
    prompts = [encoder.encode(e)[0] for e in examples]
    labels = label_token_ids(tokenizer, template.labels[: config.candidates])
    candidates = [[tokenizer.convert_tokens_to_ids(item_token(i)) for i in e.candidates] for e in examples]
    basis = score_basis(base, windows.item_token_ids, config.item_lm.rank or base.config.hidden_size)
    scores = candidate_scores(base, prompts, candidates, windows.marker_id, basis)
    held_out = max(1, min(256, len(examples) // 10))  # checks the compiled model; not used to fit
    targets = torch.tensor([e.target for e in examples])
    tau, bias = fit_readout(scores[held_out:], targets[held_out:])
    readout_loss = float(
        torch.nn.functional.cross_entropy(tau * scores[held_out:] + torch.tensor(bias), targets[held_out:])
    )
    model = compile_ranker(
        base,
        tokenizer,
        template,
        tau,
        bias,
        basis,
        windows.item_token_ids,
        prompts[held_out : held_out + 256],
    )
    agreement = compiled_agreement(
        model,
        prompts[:held_out],
        tau * scores[:held_out] + torch.tensor(bias),
        labels,
        tokenizer.pad_token_id,
    )
    if agreement < 0.95:
        warnings.warn(
            f"the compiled ranker's top candidate matches the readout's on only {agreement:.0%} of "
            "held-out examples; its scales may not suit this item LM (please report it)",
            stacklevel=2,
        )
    ranker = Ranker(model, tokenizer, template, fingerprint="unsaved")
    summary = {
        **stats,
        "final_loss": readout_loss,
        "item_lm_final_loss": float(np.mean(losses[-20:])),
        "readout_tau": tau,
        "readout_bias": [round(float(b), 4) for b in bias],
        "compiled_top1_agreement": agreement,
        "train_seconds": time.perf_counter() - started,
        **stopping,
        "parameters": sum(p.numel() for p in model.parameters()),
        **config.record(),
    }
    save_ranker(ranker, out_dir, training=summary)
    return ranker, summary


def _train_content_item_lm(
    sequences: list[list[int]],
    catalog: dict[int, ItemInfo],
    windows: UserBlockWindows,
    config,
    progress: bool,
) -> tuple[LlamaForCausalLM, list[float], dict]:
    """``--item-features content``: train on the target catalog (and ``config.content.pretrain_worlds``
    synthetic ones), then write the target's content embeddings into its item tokens' rows."""
    from .content import Catalog, ContentWindows, synthetic_catalogs, train_content_item_lm

    row = {item: n for n, item in enumerate(catalog)}  # the order of windows.item_token_ids
    target = Catalog.from_sequences(list(catalog.values()), [[row[i] for i in s] for s in sequences])
    pretrain = synthetic_catalogs(config.content.pretrain_worlds)
    model, losses, record = train_content_item_lm(
        target,
        pretrain,
        ContentWindows(windows.template, windows.tokenizer),
        config,
        item_lm_config(windows.tokenizer, config.size, tie=False),
        progress,
    )
    return model.materialize(target, windows.item_token_ids).eval(), losses, record


def _check_labels_unused(windows: UserBlockWindows, tokenizer, template: PromptTemplate, k: int) -> None:
    """The compiled model rewrites the label tokens' embeddings; they must occur nowhere but in label
    blocks: not in history lines, the system block or the footer, nor in any item block as served."""
    labels = set(label_token_ids(tokenizer, template.labels[:k]))
    used = {t for line in windows._lines.values() for t in line} | set(windows._head) | set(windows._footer)
    encoder = PromptEncoder(template, tokenizer)
    blocks = {t for info in windows.catalog.values() for t in encoder.item_ids(info)}
    for where, clash in (("history lines", labels & used), ("item blocks", labels & blocks)):
        if clash:
            raise TrainingDataError(
                f"label tokens {tokenizer.convert_ids_to_tokens(sorted(clash))} occur in {where}; the "
                "item-lm recipe needs labels that appear nowhere else (fewer --item-text-words, or a "
                "larger --vocab-size so descriptions are not spelt letter by letter)"
            )
