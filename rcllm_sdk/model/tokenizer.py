"""A byte-level BPE tokenizer trained offline on the catalog and template text."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..errors import LabelTokenError
from ..prompt.template import (
    DEFAULT_LABEL_FORMAT,
    NEXT_MARKER,
    RELATION_MARKERS,
    PromptTemplate,
    item_token,
    label_text,
)

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
    template_text += [template.label_line(label) for label in template.labels]  # "10" learns to be one token
    core.train_from_iterator(list(texts) + template_text * 50, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIALS)
    tokenizer.add_tokens([item_token(int(i)) for i in item_ids], special_tokens=True)
    if NEXT_MARKER in template.history_footer:
        tokenizer.add_tokens([NEXT_MARKER], special_tokens=True)
    if template.relation_markers:
        tokenizer.add_tokens(list(RELATION_MARKERS), special_tokens=True)
    return tokenizer


def label_token_ids(tokenizer, labels: list[str], label_format: str = DEFAULT_LABEL_FORMAT) -> list[int]:
    """The scored token id of each label: the one token of its label block (``label_format`` with
    the label, tokenised as the prompt's label block) that spells the label, a leading space or
    ``▁`` allowed. The model reads that token in the candidate list and is scored on emitting it
    after the query: for ``"(A) "`` it is ``A`` in ``(``/``A``/``)``, never a separate `` A``.

    Raises:
        LabelTokenError: a label is not one token of its block, or two labels share a token id.
    """
    ids = [_label_id(tokenizer, label, label_format) for label in labels]
    shared = sorted({x for x, i in zip(labels, ids, strict=True) if ids.count(i) > 1})
    if shared:
        raise LabelTokenError(f"labels {shared} share a token id in this tokenizer; use distinct labels")
    return ids


def _label_id(tokenizer, label: str, label_format: str) -> int:
    block = label_text(label_format, label)
    encoded = tokenizer([block], add_special_tokens=False)["input_ids"][0]
    spelled = {i for i in encoded if tokenizer.decode([i]).strip().lstrip("▁") == label}
    if len(spelled) != 1:
        pieces = tokenizer.convert_ids_to_tokens(list(encoded))
        raise LabelTokenError(
            f"label {label!r} is not one token in this tokenizer as the label block {block!r} writes it "
            f"(tokens {pieces}); labels must be one token each: choose other labels (letters are one "
            "token in most tokenizers) or another label_format"
        )
    return spelled.pop()
