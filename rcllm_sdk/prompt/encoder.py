"""The one encoding of the prompt layout, used by serving and by every training recipe. No torch.

A prompt is the concatenation of its blocks' token ids: system, user history, a label and an
item block per candidate, query. Each block is tokenised on its own (the template's boundary
rule makes that equal to tokenising the whole text, tested), so a block's ids never depend on
its neighbours and can be cached: fixed texts and item lines are tokenised once.

Item fields (title, category, description) come from the catalog, which a seller may write:
before an item is written into a prompt, line breaks become spaces (no field can start a label
line) and every string the tokenizer reads as a special token (``<i5>``, ``</s>``, ``<next>``,
``<|im_start|>`` ...) is removed, so no field can produce a control token or another item's token.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace

from ..errors import ConfigError
from .renderer import (
    ITEM,
    LABEL,
    QUERY,
    SYSTEM,
    USER,
    Block,
    ItemInfo,
    RenderedPrompt,
    Tokenizer,
    block_hash,
)
from .template import PromptTemplate

MAX_CACHED_TEXTS = 1_000_000  # item lines and fixed texts kept tokenised (a catalog's worth)
_LINE_BREAKS = re.compile(r"[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")  # what str.splitlines splits on
MAX_STRIP_PASSES = 8  # removing a special token can join the halves of another: repeat until none

Parts = list[tuple[str, tuple[int, ...]]]  # (kind, token ids) of each block, in prompt order


class PromptEncoder:
    """Token ids of prompt blocks for one template and tokenizer.

    Example:
        >>> encoder = PromptEncoder(template, tokenizer)
        >>> prompt = encoder.render(history, candidates, fingerprint="model-v1")
        >>> prompt.input_ids == [t for _, ids in encoder.parts(history, candidates) for t in ids]
        True
    """

    def __init__(self, template: PromptTemplate, tokenizer: Tokenizer):
        self.template, self.tokenizer = template, tokenizer
        self._cached: dict[str, tuple[int, ...]] = {}
        self._specials = frozenset(getattr(tokenizer, "get_added_vocab", dict)())
        self._cleaned: dict[str, str] = {}

    def parts(self, history: Sequence[ItemInfo], candidates: Sequence[ItemInfo]) -> Parts:
        """``(kind, ids)`` of every block; the history is cut to the template's ``max_history``."""
        t = self.template
        if len(candidates) > len(t.labels):
            raise ConfigError(f"{len(candidates)} candidates but only {len(t.labels)} labels in the template")
        parts = [(SYSTEM, self._ids(t.system)), (USER, self.user_ids(history))]
        for label, item in zip(t.labels, candidates, strict=False):
            parts += [(LABEL, self._ids(t.label_line(label))), (ITEM, self.item_ids(item))]
        parts.append((QUERY, self._ids(t.query)))
        return parts

    def user_ids(self, history: Sequence[ItemInfo]) -> tuple[int, ...]:
        """The user block (never cached: every history is its own)."""
        return self._tokenise(self.template.user_text([self.clean(i) for i in history]))

    def item_ids(self, item: ItemInfo) -> tuple[int, ...]:
        """An item block as served: its line with the template's description words."""
        i = self.clean(item)
        return self._ids(self.template.item_line(i.item_id, i.title, i.category, i.text, True))

    def clean(self, item: ItemInfo) -> ItemInfo:
        """The item with its text fields made safe to write into a prompt (see the module doc)."""
        return ItemInfo(
            item.item_id, self._field(item.title), self._field(item.category), self._field(item.text)
        )

    def render(
        self, history: Sequence[ItemInfo], candidates: Sequence[ItemInfo], fingerprint: str
    ) -> RenderedPrompt:
        """The hashed, spanned blocks of one ranking prompt."""
        item_ids = [None, None] + [i for item in candidates for i in (None, item.item_id)] + [None]
        blocks = _blocks(self.parts(history, candidates), fingerprint, item_ids)
        return RenderedPrompt(
            tuple(blocks),
            tuple(i.item_id for i in candidates),
            tuple(self.template.labels[: len(candidates)]),
        )

    def cacheable_blocks(
        self, histories: Sequence[Sequence[ItemInfo]], items: Sequence[ItemInfo], fingerprint: str
    ) -> list[Block]:
        """The system block, one user block per history and one item block per item, exactly as
        prompts contain them (same token ids, so the same content hashes), each starting at 0."""
        parts = [(SYSTEM, self._ids(self.template.system))]
        parts += [(USER, self.user_ids(h)) for h in histories]
        parts += [(ITEM, self.item_ids(i)) for i in items]
        item_ids = [None] * (1 + len(histories)) + [i.item_id for i in items]
        return [replace(b, start=0) for b in _blocks(parts, fingerprint, item_ids)]

    def _ids(self, text: str) -> tuple[int, ...]:
        ids = self._cached.get(text)
        if ids is None:
            if len(self._cached) >= MAX_CACHED_TEXTS:
                self._cached.clear()
            ids = self._cached[text] = self._tokenise(text)
        return ids

    def _field(self, text: str) -> str:
        cleaned = self._cleaned.get(text)
        if cleaned is None:
            if len(self._cleaned) >= MAX_CACHED_TEXTS:
                self._cleaned.clear()
            cleaned = self._cleaned[text] = self._strip_specials(_LINE_BREAKS.sub(" ", text))
        return cleaned

    def _strip_specials(self, text: str) -> str:
        """``text`` without the strings the tokenizer reads as special tokens (found by tokenising)."""
        for _ in range(MAX_STRIP_PASSES):
            tokens = (
                self.tokenizer.convert_ids_to_tokens(list(self._tokenise(text))) if self._specials else []
            )
            found = sorted({t for t in tokens if t in self._specials}, key=len, reverse=True)
            if not found:
                return text
            for special in found:
                text = text.replace(special, "")
        raise ConfigError(
            f"item text {text[:80]!r} still holds special tokens after {MAX_STRIP_PASSES} passes"
        )

    def _tokenise(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer([text], add_special_tokens=False)["input_ids"][0])


def _blocks(parts: Parts, fingerprint: str, item_ids: Sequence[int | None]) -> list[Block]:
    blocks, start = [], 0
    for (kind, ids), item in zip(parts, item_ids, strict=True):
        blocks.append(Block(kind, ids, start, block_hash(fingerprint, kind, ids), item))
        start += len(ids)
    return blocks


def render(
    history: Sequence[ItemInfo],
    candidates: Sequence[ItemInfo],
    template: PromptTemplate,
    tokenizer: Tokenizer,
    fingerprint: str,
) -> RenderedPrompt:
    """One prompt without keeping an encoder (hold a :class:`PromptEncoder` to reuse its cache).

    Example:
        >>> p = render(history, candidates, PromptTemplate(), tokenizer, "model-v1")
        >>> p.input_ids == tokenizer(full_text(history, candidates, template))["input_ids"]
        True
    """
    return PromptEncoder(template, tokenizer).render(history, candidates, fingerprint)


def cacheable_blocks(
    histories: Sequence[Sequence[ItemInfo]],
    items: Sequence[ItemInfo],
    template: PromptTemplate,
    tokenizer: Tokenizer,
    fingerprint: str,
) -> list[Block]:
    """:meth:`PromptEncoder.cacheable_blocks` without keeping an encoder."""
    return PromptEncoder(template, tokenizer).cacheable_blocks(histories, items, fingerprint)
