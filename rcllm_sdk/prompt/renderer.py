"""Pure rendering of (history, candidates, template) into hashed, spanned blocks. No torch."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from ..errors import ConfigError
from .template import PromptTemplate

SYSTEM, USER, LABEL, ITEM, QUERY = "system", "user", "label", "item", "query"


class Tokenizer(Protocol):
    def __call__(self, texts: list[str], add_special_tokens: bool = ...) -> Mapping: ...


@dataclass(slots=True, frozen=True)
class ItemInfo:
    """The item features a prompt shows (from the Feast item view)."""

    item_id: int
    title: str
    category: str
    text: str = ""


@dataclass(slots=True, frozen=True)
class Block:
    """One prompt block: its kind, tokens, [start, end) span in the prompt, content hash, and
    for item blocks the item id (where a sharded store keeps the block)."""

    kind: str
    token_ids: tuple[int, ...]
    start: int
    content_hash: int
    item_id: int | None = None

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)


@dataclass(slots=True, frozen=True)
class RenderedPrompt:
    blocks: tuple[Block, ...]
    candidate_ids: tuple[int, ...]
    labels: tuple[str, ...]

    @property
    def input_ids(self) -> list[int]:
        return [t for b in self.blocks for t in b.token_ids]

    @property
    def text_length(self) -> int:
        return self.blocks[-1].end if self.blocks else 0


def block_hash(fingerprint: str, kind: str, token_ids: Sequence[int]) -> int:
    """64-bit content hash of a block under one model/tokenizer fingerprint."""
    h = hashlib.blake2b(digest_size=8)
    h.update(fingerprint.encode())
    h.update(kind.encode())
    h.update(b"".join(int(t).to_bytes(4, "little") for t in token_ids))
    return int.from_bytes(h.digest(), "little")


def block_texts(
    history: Sequence[ItemInfo], candidates: Sequence[ItemInfo], template: PromptTemplate
) -> list[tuple[str, str]]:
    """``(kind, text)`` of every block in prompt order."""
    if len(candidates) > len(template.labels):
        raise ConfigError(
            f"{len(candidates)} candidates but only {len(template.labels)} labels in the template"
        )
    parts = [(SYSTEM, template.system), (USER, template.user_text(history))]
    for label, item in zip(template.labels, candidates, strict=False):
        parts.append((LABEL, template.label_line(label)))
        parts.append(
            (ITEM, template.item_line(item.item_id, item.title, item.category, item.text, with_text=True))
        )
    parts.append((QUERY, template.query))
    return parts


def render(
    history: Sequence[ItemInfo],
    candidates: Sequence[ItemInfo],
    template: PromptTemplate,
    tokenizer: Tokenizer,
    fingerprint: str,
) -> RenderedPrompt:
    """Render the blocks of one ranking prompt.

    Example:
        >>> p = render(history, candidates, PromptTemplate(), tokenizer, "model-v1")
        >>> p.input_ids == tokenizer(full_text, add_special_tokens=False)["input_ids"]
        True
    """
    item_ids = [None, None] + [i for item in candidates for i in (None, item.item_id)] + [None]
    blocks = encode_blocks(block_texts(history, candidates, template), tokenizer, fingerprint, item_ids)
    labels = tuple(template.labels[: len(candidates)])
    return RenderedPrompt(tuple(blocks), tuple(i.item_id for i in candidates), labels)


def encode_blocks(
    parts: Sequence[tuple[str, str]],
    tokenizer: Tokenizer,
    fingerprint: str,
    item_ids: Sequence[int | None] | None = None,
) -> list[Block]:
    """Tokenise ``(kind, text)`` parts into consecutive blocks (spans start at 0); ``item_ids``
    gives each part's item id (None for non-item parts)."""
    encoded = tokenizer([text for _, text in parts], add_special_tokens=False)["input_ids"]
    item_ids = item_ids if item_ids is not None else [None] * len(parts)
    blocks, start = [], 0
    for (kind, _), ids, item in zip(parts, encoded, item_ids, strict=False):
        blocks.append(Block(kind, tuple(ids), start, block_hash(fingerprint, kind, ids), item))
        start += len(ids)
    return blocks


def cacheable_blocks(
    histories: Sequence[Sequence[ItemInfo]],
    items: Sequence[ItemInfo],
    template: PromptTemplate,
    tokenizer: Tokenizer,
    fingerprint: str,
) -> list[Block]:
    """The system block, one user block per history and one item block per item, exactly as
    prompts contain them (same token ids, so the same content hashes)."""
    parts = [(SYSTEM, template.system)]
    parts += [(USER, template.user_text(list(h))) for h in histories]
    parts += [
        (ITEM, template.item_line(i.item_id, i.title, i.category, i.text, with_text=True)) for i in items
    ]
    item_ids = [None] * (1 + len(histories)) + [i.item_id for i in items]
    return [replace(b, start=0) for b in encode_blocks(parts, tokenizer, fingerprint, item_ids)]


def full_text(history, candidates, template: PromptTemplate) -> str:
    """The whole prompt as one string (what the blocks must tokenise to)."""
    return "".join(text for _, text in block_texts(history, candidates, template))
