"""The prompt template: the fixed texts around the blocks and how an item is written.

Block-boundary rule: every block but a label block ends with a newline, and none starts with
whitespace except a candidate's item block, which starts with the spaces that end the label
format (``"(A) "`` is the label block ``"(A)"`` and an item block ``" Title ..."``). Byte-level
BPE pre-tokenisers (GPT-2, Llama 3, Qwen) then never merge tokens across a block boundary: the
blocks' token ids concatenate to the tokenisation of the whole prompt (tested). The prompt is
defined as that concatenation whatever the tokenizer (see ``rcllm_sdk.prompt.check``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

from ..errors import ConfigError, TemplateError

LETTERS = [chr(c) for c in range(ord("A"), ord("Z") + 1)] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
LABEL_SLOT, VALUE_SLOT = "{label}", "{value}"
DEFAULT_LABEL_FORMAT = "{label}\n"
ITEM_FIELD_NAMES = ("title", "category", "text")  # the Feast item view's text features
ITEM_FIELD_KEYS = ("name", "max_words", "format", "history")


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
        label_format: how a label is written before its item (``"{label}\\n"``, ``"({label}) "``,
            ``"{label}. "``); the scored token is the label itself (``rcllm_sdk.model.tokenizer``).
        bos: the system block starts with the tokenizer's BOS token id.
        chat_template: wrap the prompt in the tokenizer's chat template as one user turn: the
            chat prefix opens the system block, the suffix (generation prompt) closes the query.
        item_fields: when given, the item line instead of ``titles``/``categories``/``item_text_words``:
            ``{"name": title|category|text, "max_words": N (0: all), "format": "...{value}...",
            "history": also in history lines}`` per field, in order, joined by ``field_separator``.
        field_separator: text between two ``item_fields`` of a line.
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
    label_format: str = DEFAULT_LABEL_FORMAT
    bos: bool = False
    chat_template: bool = False
    item_fields: list[dict] = field(default_factory=list)
    field_separator: str = " | "

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
        self.item_fields = [_item_field(f) for f in self.item_fields]
        if not (self.item_tokens or self.titles or self.categories or self.item_fields):
            raise ConfigError("an item line needs at least one of item_tokens, titles and categories")
        if not self.labels or not all(isinstance(x, str) and x.strip() == x != "" for x in self.labels):
            raise TemplateError("labels must be non-empty strings without surrounding whitespace")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError("labels must be distinct")
        _check_label_format(self.label_format)

    def item_line(
        self, item_id: int, title: str, category: str, text: str = "", with_text: bool = False
    ) -> str:
        """One item as text, ending with a newline and starting with no whitespace; ``with_text``:
        as a candidate's item block shows it (history lines leave the description out)."""
        head = item_token(item_id) if self.item_tokens else ""
        if self.item_fields:
            values = {"title": title, "category": category, "text": text}
            return (head + self._fields_text(values, with_text)).lstrip() + "\n"
        words = [title.strip()] if self.titles else []
        if self.categories:
            words.append(f"({category.replace('|', ', ')})")
        line = head + " ".join(words)
        if with_text and self.item_text_words and text:
            line += ": " + " ".join(text.split()[: self.item_text_words])
        return line.lstrip() + "\n"

    def candidate_text(self, item_id: int, title: str, category: str, text: str = "") -> str:
        """A candidate's item block: the spaces ending the label format, then its item line."""
        return self.item_lead + self.item_line(item_id, title, category, text, with_text=True)

    def _fields_text(self, values: dict[str, str], candidate: bool) -> str:
        parts = []
        for f in self.item_fields:
            if not (candidate or f["history"]):
                continue
            value = values[f["name"]].replace("|", ", ") if f["name"] == "category" else values[f["name"]]
            words = value.split()
            if f["max_words"]:
                words = words[: f["max_words"]]
            shown = " ".join(words).rstrip(",;")  # a cut list of categories ends on a word
            if shown:
                parts.append(f["format"].replace(VALUE_SLOT, shown))
        return self.field_separator.join(parts)

    def user_text(self, history) -> str:
        """The user block: header and the most recent ``max_history`` items (``ItemInfo``-like)."""
        recent = history[-self.max_history :]
        lines = [self.item_line(i.item_id, i.title, i.category, getattr(i, "text", "")) for i in recent]
        if self.relation_markers:
            lines[1:] = [
                relation(a.title, a.category, b.title, b.category) + line
                for line, a, b in zip(lines[1:], recent, recent[1:], strict=False)
            ]
        return self.history_header + "".join(lines) + self.history_footer

    def label_line(self, label: str) -> str:
        """The label block: ``label_format`` with the label, less the spaces that end it."""
        return label_text(self.label_format, label)

    @property
    def item_lead(self) -> str:
        """The spaces ending ``label_format``: they open each candidate's item block."""
        return self.label_format[len(self.label_format.rstrip(" \t")) :]

    def to_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}

    def digest(self) -> str:
        """16 hex digits over every setting: part of each block's cache key."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def label_text(label_format: str, label: str) -> str:
    """A label block's text: ``label_format`` with ``label``, less the spaces that end it."""
    return label_format.replace(LABEL_SLOT, label).rstrip(" \t")


def _check_label_format(label_format: str) -> None:
    if not isinstance(label_format, str) or label_format.count(LABEL_SLOT) != 1:
        raise TemplateError(f"label_format must hold {LABEL_SLOT} exactly once, got {label_format!r}")
    if label_format[0].isspace() or label_format[-1] not in " \t\n":
        raise TemplateError(
            f"label_format {label_format!r} must not start with whitespace and must end with a space "
            "or a newline (block boundary rule), e.g. '({label}) ', '{label}. ' or '{label}\\n'"
        )


def _item_field(spec) -> dict:
    """An ``item_fields`` entry with its defaults filled in, or TemplateError."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or set(spec) - set(ITEM_FIELD_KEYS):
        raise TemplateError(
            f"item field {spec!r}: a mapping with keys among {list(ITEM_FIELD_KEYS)} (name required)"
        )
    name = spec.get("name")
    if name not in ITEM_FIELD_NAMES:
        raise TemplateError(f"item field name {name!r} is not one of {list(ITEM_FIELD_NAMES)}")
    out = {"name": name, "max_words": spec.get("max_words", 0), "format": spec.get("format", VALUE_SLOT)}
    out["history"] = spec.get("history", True)
    if isinstance(out["max_words"], bool) or not isinstance(out["max_words"], int) or out["max_words"] < 0:
        raise TemplateError(f"item field {name}: max_words must be an integer >= 0 (0: all words)")
    if not isinstance(out["format"], str) or out["format"].count(VALUE_SLOT) != 1 or "\n" in out["format"]:
        raise TemplateError(f"item field {name}: format must hold {VALUE_SLOT} once and no line break")
    if not isinstance(out["history"], bool):
        raise TemplateError(f"item field {name}: history must be true or false")
    return out
