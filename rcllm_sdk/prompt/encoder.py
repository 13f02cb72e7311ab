"""The one encoding of the prompt layout, used by serving and by every training recipe. No torch.

A prompt is the concatenation of its blocks' token ids: system, user history, a label and an
item block per candidate, query; ``full``, ``prefix`` and ``rcllm`` all score that sequence. Each
block is tokenised on its own, so a block's ids never depend on its neighbours and can be cached:
fixed texts and item lines are tokenised once. For byte-level BPE the template's boundary rule
makes the concatenation equal to tokenising the whole text (tested); where a tokenizer differs
(SentencePiece prepends ``▁`` to each block), :mod:`rcllm_sdk.prompt.check` says so at load.

Template settings that need the tokenizer are applied here: ``bos`` puts the BOS id first in the
system block; ``chat_template`` renders the tokenizer's chat template around one user turn and
puts its prefix at the start of the system block and its suffix (the generation prompt) at the
end of the query block, so every other block is unchanged and still cacheable. Block hashes use
:meth:`PromptEncoder.cache_key`: the model fingerprint combined with the template's digest, so a
changed template never reuses blocks of another.

Item fields (title, category, description) come from the catalog, which a seller may write:
before an item is written into a prompt, line breaks become spaces (no field can start a label
line) and every string the tokenizer reads as a special token (``<i5>``, ``</s>``, ``<next>``,
``<|im_start|>`` ...) is removed, so no field can produce a control token or another item's token.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace

from ..errors import ConfigError, TemplateError
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
CHAT_SLOT = "RCLLMPROMPTCONTENT"  # stands for the prompt when the chat template is rendered

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
        prefix, suffix = chat_parts(tokenizer) if template.chat_template else ("", "")
        self.system_text, self.query_text = prefix + template.system, template.query + suffix
        self._bos = _bos_ids(tokenizer, prefix) if template.bos else ()
        self._digest = template.digest()

    @property
    def bos_ids(self) -> tuple[int, ...]:
        """The BOS id opening the system block (``bos``), else nothing."""
        return self._bos

    def cache_key(self, fingerprint: str) -> str:
        """What block hashes are computed under: the model fingerprint and the template's digest."""
        return f"{fingerprint}/template:{self._digest}"

    def texts(self, history: Sequence[ItemInfo], candidates: Sequence[ItemInfo]) -> list[tuple[str, str]]:
        """``(kind, text)`` of every block, item fields cleaned; the BOS id is not text."""
        t = self.template
        if len(candidates) > len(t.labels):
            raise ConfigError(f"{len(candidates)} candidates but only {len(t.labels)} labels in the template")
        texts = [(SYSTEM, self.system_text), (USER, t.user_text([self.clean(i) for i in history]))]
        for label, item in zip(t.labels, candidates, strict=False):
            i = self.clean(item)
            texts += [
                (LABEL, t.label_line(label)),
                (ITEM, t.candidate_text(i.item_id, i.title, i.category, i.text)),
            ]
        texts.append((QUERY, self.query_text))
        return texts

    def parts(self, history: Sequence[ItemInfo], candidates: Sequence[ItemInfo]) -> Parts:
        """``(kind, ids)`` of every block; the history is cut to the template's ``max_history``."""
        return [(kind, self._block_ids(kind, text)) for kind, text in self.texts(history, candidates)]

    def system_ids(self) -> tuple[int, ...]:
        """The system block: BOS (``bos``), chat prefix (``chat_template``) and instruction."""
        return self._bos + self._ids(self.system_text)

    def user_ids(self, history: Sequence[ItemInfo]) -> tuple[int, ...]:
        """The user block (never cached: every history is its own)."""
        return self._tokenise(self.template.user_text([self.clean(i) for i in history]))

    def item_ids(self, item: ItemInfo) -> tuple[int, ...]:
        """A candidate's item block as served: its line with every item field of the template."""
        i = self.clean(item)
        return self._ids(self.template.candidate_text(i.item_id, i.title, i.category, i.text))

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
        blocks = _blocks(self.parts(history, candidates), self.cache_key(fingerprint), item_ids)
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
        parts = [(SYSTEM, self.system_ids())]
        parts += [(USER, self.user_ids(h)) for h in histories]
        parts += [(ITEM, self.item_ids(i)) for i in items]
        item_ids = [None] * (1 + len(histories)) + [i.item_id for i in items]
        return [replace(b, start=0) for b in _blocks(parts, self.cache_key(fingerprint), item_ids)]

    def _block_ids(self, kind: str, text: str) -> tuple[int, ...]:
        if kind == USER:
            return self._tokenise(text)  # never cached: every history is its own
        return self._bos + self._ids(text) if kind == SYSTEM else self._ids(text)

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


def _blocks(parts: Parts, key: str, item_ids: Sequence[int | None]) -> list[Block]:
    blocks, start = [], 0
    for (kind, ids), item in zip(parts, item_ids, strict=True):
        blocks.append(Block(kind, ids, start, block_hash(key, kind, ids), item))
        start += len(ids)
    return blocks


def chat_parts(tokenizer) -> tuple[str, str]:
    """``(prefix, suffix)`` the tokenizer's chat template writes around one user turn, with the
    generation prompt (the assistant's turn opening) in the suffix."""
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            "the template sets chat_template: true but the tokenizer has no chat template; "
            "set chat_template: false or use a tokenizer that ships one (tokenizer_config.json)"
        )
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": CHAT_SLOT}], tokenize=False, add_generation_prompt=True
    )
    prefix, found, suffix = text.partition(CHAT_SLOT)
    if not found or CHAT_SLOT in suffix:
        raise TemplateError("the tokenizer's chat template does not write the user turn once, verbatim")
    return prefix, suffix


def _bos_ids(tokenizer, chat_prefix: str) -> tuple[int, ...]:
    """The BOS id to open the system block (none when the chat prefix already starts with it)."""
    bos_id, bos_text = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "bos_token", None)
    if bos_id is None:
        raise TemplateError("the template sets bos: true but the tokenizer has no BOS token; set bos: false")
    return () if bos_text and chat_prefix.startswith(bos_text) else (int(bos_id),)


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
