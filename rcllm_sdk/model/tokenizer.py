"""A byte-level BPE tokenizer trained offline on the catalog and template text."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..errors import ConfigError
from ..prompt.template import NEXT_MARKER, RELATION_MARKERS, PromptTemplate, item_token

SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def train_tokenizer(
    texts: Iterable[str], item_ids: Iterable[int], template: PromptTemplate, vocab_size: int = 4000
) -> PreTrainedTokenizerFast:
    """Train BPE on ``texts`` plus the template, then add one token per item (and ``NEXT_MARKER``
    when the template's history footer uses it, ``RELATION_MARKERS`` when it writes them).

    Example:
        >>> tok = train_tokenizer(items["title"], items["item_id"], PromptTemplate())
    """
    core = Tokenizer(models.BPE(unk_token=SPECIALS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    template_text = [template.system, template.history_header, template.query]
    core.train_from_iterator(list(texts) + template_text * 50, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIALS)
    tokenizer.add_tokens([item_token(int(i)) for i in item_ids], special_tokens=True)
    if NEXT_MARKER in template.history_footer:
        tokenizer.add_tokens([NEXT_MARKER], special_tokens=True)
    if template.relation_markers:
        tokenizer.add_tokens(list(RELATION_MARKERS), special_tokens=True)
    return tokenizer


def label_token_ids(tokenizer, labels: list[str]) -> list[int]:
    """The single token id of each label as it is written in a label block."""
    ids = []
    for label in labels:
        encoded = tokenizer(label, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise ConfigError(
                f"label {label!r} is {len(encoded)} tokens in this tokenizer; labels must be one token each"
            )
        ids.append(encoded[0])
    return ids
