"""The prompt template: the fixed texts around the blocks and how an item is written.

Every block ends with a newline and none starts with whitespace, so byte-level BPE
pre-tokenisers (GPT-2, Llama 3, Qwen) never merge tokens across a block boundary: the
blocks' token ids concatenate to the tokenisation of the whole prompt (tested).
"""
from __future__ import annotations

from dataclasses import dataclass, field

LETTERS = [chr(c) for c in range(ord("A"), ord("Z") + 1)] + [chr(c) for c in range(ord("a"), ord("z") + 1)]


NEXT_MARKER = "<next>"  # a special token ending the user block of item-LM rankers (pipelines/item_lm_ranker.py)


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

    def __post_init__(self):
        if not self.system.endswith("\n") or not self.history_header.endswith("\n"):
            raise ValueError("system and history_header must end with a newline (block boundary rule)")
        if self.history_footer and (not self.history_footer.endswith("\n") or self.history_footer[0].isspace()):
            raise ValueError("history_footer must end with a newline and not start with whitespace (block boundary rule)")
        if self.max_history < 1:
            raise ValueError("max_history must be at least 1")
        if not (self.item_tokens or self.titles or self.categories):
            raise ValueError("an item line needs at least one of item_tokens, titles and categories")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be distinct")

    def item_line(self, item_id: int, title: str, category: str, text: str = "", with_text: bool = False) -> str:
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
        recent = history[-self.max_history:]
        lines = "".join(self.item_line(i.item_id, i.title, i.category) for i in recent)
        return self.history_header + lines + self.history_footer

    def label_line(self, label: str) -> str:
        return f"{label}\n"

    def to_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}
