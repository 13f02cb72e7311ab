"""Prompt data types (items, blocks, rendered prompts), block hashes and the prompt's text layout.
No torch. Token ids come from :class:`rcllm_sdk.prompt.encoder.PromptEncoder`."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
    """``(kind, text)`` of every block in prompt order, without what needs the tokenizer (BOS and the
    chat template: :meth:`rcllm_sdk.prompt.PromptEncoder.texts` has those)."""
    if len(candidates) > len(template.labels):
        raise ConfigError(
            f"{len(candidates)} candidates but only {len(template.labels)} labels in the template"
        )
    parts = [(SYSTEM, template.system), (USER, template.user_text(history))]
    for label, item in zip(template.labels, candidates, strict=False):
        parts.append((LABEL, template.label_line(label)))
        parts.append((ITEM, template.candidate_text(item.item_id, item.title, item.category, item.text)))
    parts.append((QUERY, template.query))
    return parts


def full_text(history, candidates, template: PromptTemplate) -> str:
    """The whole prompt as one string (what the blocks must tokenise to)."""
    return "".join(text for _, text in block_texts(history, candidates, template))
