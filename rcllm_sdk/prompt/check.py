"""Load-time check: do this tokenizer and template tokenise each block as the whole prompt would?

A prompt is the concatenation of its blocks' token ids, so ``full``, ``prefix`` and ``rcllm``
always see identical tokens. Whether that equals tokenising the whole prompt text depends on
the tokenizer: byte-level BPE with the template's boundary rule does (tested); SentencePiece
puts a ``▁`` before the first word of every block, so its blocks differ from the whole text.
That does not change what the modes compute, but a model fine-tuned on whole-text tokenisation
meets slightly different tokens; the recommender says so once per model and template.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from .encoder import PromptEncoder
from .renderer import ItemInfo

log = logging.getLogger("rcllm_sdk.prompt")

SAMPLE_HISTORY = (
    ItemInfo(1, "The Long Voyage Home", "Drama|Adventure", "A ship's crew sails home after the war."),
    ItemInfo(2, "Solar Saga Part 2", "Science Fiction", "The fleet returns to the outer moons."),
)
SAMPLE_CANDIDATES = (
    ItemInfo(3, "Solar Saga Part 3", "Science Fiction", "The last voyage of the fleet, told in full."),
    ItemInfo(4, "(500) Days: Redux", "Romance|Comedy", "Two people, one city and a long summer."),
)
CONTEXT_TOKENS = 3  # tokens shown on each side of the first difference

_reported: set[tuple[str, str]] = set()
_reported_lock = threading.Lock()


@dataclass(slots=True, frozen=True)
class TokenisationCheck:
    """Block ids against whole-text ids of one sample prompt."""

    block_tokens: int
    whole_tokens: int
    first_difference: int | None  # token index where they part (None: identical)
    detail: str = ""  # the block and the tokens around the first difference

    @property
    def identical(self) -> bool:
        return self.first_difference is None


def check_block_tokenisation(
    encoder: PromptEncoder, history=SAMPLE_HISTORY, candidates=SAMPLE_CANDIDATES
) -> TokenisationCheck:
    """Render one prompt as blocks and as one text; where their token ids part, and in which block."""
    parts = encoder.parts(history, candidates)
    blocks = [t for _, ids in parts for t in ids]
    text = "".join(t for _, t in encoder.texts(history, candidates))
    whole = list(encoder.bos_ids) + list(encoder.tokenizer([text], add_special_tokens=False)["input_ids"][0])
    first = next((n for n, (a, b) in enumerate(zip(blocks, whole, strict=False)) if a != b), None)
    if first is None and len(blocks) != len(whole):
        first = min(len(blocks), len(whole))
    if first is None:
        return TokenisationCheck(len(blocks), len(whole), None)
    return TokenisationCheck(len(blocks), len(whole), first, _detail(encoder, parts, blocks, whole, first))


def warn_if_blocks_differ(encoder: PromptEncoder, fingerprint: str) -> TokenisationCheck:
    """Run :func:`check_block_tokenisation`; log one warning per model and template when they differ."""
    result = check_block_tokenisation(encoder)
    key = (fingerprint, encoder.cache_key(fingerprint))
    with _reported_lock:
        if result.identical or key in _reported:
            return result
        _reported.add(key)
    log.warning(
        "this tokenizer and template tokenise prompt blocks differently from the whole prompt text "
        "(sample prompt: %d tokens as blocks, %d as one text; %s). The modes full, prefix and rcllm "
        "still see identical tokens, because a prompt is defined as the concatenation of its blocks' "
        "ids; a model fine-tuned on whole-text tokenisation may score slightly differently than it "
        "did in training (fine-tune with `rcllm train --template`, which builds prompts as serving does).",
        result.block_tokens,
        result.whole_tokens,
        result.detail,
    )
    return result


def _detail(encoder: PromptEncoder, parts, blocks: list[int], whole: list[int], first: int) -> str:
    end, kind = 0, parts[-1][0]
    for kind, ids in parts:  # noqa: B007  (the block holding token ``first`` is the loop's last)
        end += len(ids)
        if end > first:
            break
    window = slice(max(0, first - CONTEXT_TOKENS), first + CONTEXT_TOKENS)
    tokens = getattr(encoder.tokenizer, "convert_ids_to_tokens", lambda ids: ids)
    return (
        f"first difference at token {first}, in the {kind} block: blocks {tokens(blocks[window])} "
        f"vs whole text {tokens(whole[window])}"
    )
