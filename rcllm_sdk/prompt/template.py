"""The prompt template: the fixed texts around the blocks and how an item is written.

Every block ends with a newline and none starts with whitespace, so byte-level BPE
pre-tokenisers (GPT-2, Llama 3, Qwen) never merge tokens across a block boundary: the
blocks' token ids concatenate to the tokenisation of the whole prompt (tested).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import ConfigError

LETTERS = [chr(c) for c in range(ord("A"), ord("Z") + 1)] + [chr(c) for c in range(ord("a"), ord("z") + 1)]


NEXT_MARKER = "<next>"  # a special token ending the user block of item-LM rankers (pipelines/item_lm/)
# Relation markers (``PromptTemplate.relation_markers``): special tokens opening a history line,
# saying how its item follows the line before it, read off the titles and categories the prompt shows.
SEQUEL_MARKER = "<sequel>"  # the next part of the previous item's series ("Name Part 2" after "Name Part 1")
SAME_CATEGORY_MARKER = "<same>"  # otherwise: the same category as the previous item
RELATION_MARKERS = (SEQUEL_MARKER, SAME_CATEGORY_MARKER)

_YEAR = re.compile(r"\s*\(\d{4}\)$")
_PART = re.compile(
    r"^(?P<name>.*?\S):?\s+(?:Part\s+(?P<number>\d{1,2})|(?P<digit>[2-9])|(?P<roman>II|III|IV|V|VI|VII|VIII|IX|X))$"
)
_ROMAN = {"II": 2, "III": 3, "IV": 4, "V": 5, "VI": 6, "VII": 7, "VIII": 8, "IX": 9, "X": 10}


def series_part(title: str) -> tuple[str, int]:
    """``(series name, part number)`` read off a title: "Name Part 3", "Name 3" and "Name III" are
    part 3 of "Name" (a trailing "(1995)" is ignored; bare numbers 2-9 only, so "Apollo 13" is a
    title); any other title is part 1 of itself.

    Example:
        >>> series_part("Toy Story 2 (1999)"), series_part("Heat (1995)")
        (('Toy Story', 2), ('Heat', 1))
    """
    title = _YEAR.sub("", title.strip())
    match = _PART.match(title)
    if not match:
        return title, 1
    number = match["number"] or match["digit"]
    return match["name"], int(number) if number else _ROMAN[match["roman"]]


def relation(previous_title: str, previous_category: str, title: str, category: str) -> str:
    """The relation marker of an item that follows another in a history ("" when none applies)."""
    (series, part), (previous_series, previous_part) = series_part(title), series_part(previous_title)
    if series == previous_series and part == previous_part + 1:
        return SEQUEL_MARKER
    return SAME_CATEGORY_MARKER if category == previous_category else ""


def item_token(item_id: int) -> str:
    """The special token that names one item (used when the tokenizer has item tokens)."""
    return f"<i{item_id}>"


@dataclass(slots=True)
class PromptTemplate:
    """Texts and limits of a ranking prompt.

    Attributes:
        system: the static first block.
        history_header: first line of the user block.
        query: the last block; the model's next token after it is the chosen label.
        labels: candidate labels, one token each in the model's vocabulary.
        max_history: the user block holds the most recent this many items.
        item_text_words: words of the item description in an item block (0 = title and category only).
        item_tokens: write ``<i{id}>`` before each item (tokenizers trained by this SDK have them).
        titles: write the item title (off: item token and category only, a compact prompt).
        categories: write the item category (off with ``titles`` off: the item token alone).
        history_footer: last line of the user block ("" = none); item-LM rankers end it with
            ``NEXT_MARKER``, the token whose state predicts the next item.
        relation_markers: start each history line but the block's first with its relation to the line
            before (``SEQUEL_MARKER``, ``SAME_CATEGORY_MARKER`` or nothing; see :func:`relation`).
    """

    system: str = "You rank candidate items for a user from the items the user consumed.\n"
    history_header: str = "History:\n"
    query: str = "Which candidate will the user pick next? Answer:"
    labels: list[str] = field(default_factory=lambda: list(LETTERS))
    max_history: int = 10
    item_text_words: int = 0
    item_tokens: bool = True
    titles: bool = True
    categories: bool = True
    history_footer: str = ""
    relation_markers: bool = False

    def __post_init__(self):
        if not self.system.endswith("\n") or not self.history_header.endswith("\n"):
            raise ConfigError("system and history_header must end with a newline (block boundary rule)")
        if self.history_footer and (
            not self.history_footer.endswith("\n") or self.history_footer[0].isspace()
        ):
            raise ConfigError(
                "history_footer must end with a newline and not start with whitespace (block boundary rule)"
            )
        if self.max_history < 1:
            raise ConfigError("max_history must be at least 1")
        if not (self.item_tokens or self.titles or self.categories):
            raise ConfigError("an item line needs at least one of item_tokens, titles and categories")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError("labels must be distinct")

    def item_line(
        self, item_id: int, title: str, category: str, text: str = "", with_text: bool = False
    ) -> str:
        """One item as text, ending with a newline and starting with no whitespace."""
        head = item_token(item_id) if self.item_tokens else ""
        words = [title.strip()] if self.titles else []
        if self.categories:
            words.append(f"({category.replace('|', ', ')})")
        line = head + " ".join(words)
        if with_text and self.item_text_words and text:
            line += ": " + " ".join(text.split()[: self.item_text_words])
        return line.lstrip() + "\n"

    def user_text(self, history) -> str:
        """The user block: header and the most recent ``max_history`` items (``ItemInfo``-like)."""
        recent = history[-self.max_history :]
        lines = [self.item_line(i.item_id, i.title, i.category) for i in recent]
        if self.relation_markers:
            lines[1:] = [
                relation(a.title, a.category, b.title, b.category) + line
                for line, a, b in zip(lines[1:], recent, recent[1:], strict=False)
            ]
        return self.history_header + "".join(lines) + self.history_footer

    def label_line(self, label: str) -> str:
        return f"{label}\n"

    def to_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}
