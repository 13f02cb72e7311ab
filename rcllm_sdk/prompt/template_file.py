"""Prompt templates from YAML: the keys a user writes, mapped onto :class:`PromptTemplate`.

Example file (every key optional; absent keys keep :class:`PromptTemplate`'s defaults, except
``item_tokens``, off because a pretrained tokenizer has no item tokens)::

    item_fields:
      - {name: title, max_words: 12}
      - {name: category, max_words: 4, format: "genre: {value}"}
      - {name: text, max_words: 24, history: false}
    history_length: 10
    instruction: "You rank candidate movies for a user from the movies the user watched."
    label_format: "({label}) "
    labels: letters
    bos: true
    chat_template: false
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from ..errors import ConfigError, TemplateError
from .template import LETTERS, PromptTemplate

LABEL_SETS = {
    "letters": LETTERS,  # A-Z then a-z
    "uppercase": LETTERS[:26],
    "numbers": [str(n) for n in range(1, 51)],
}
# YAML key -> (PromptTemplate field, expected type, what the error says is expected)
KEYS = {
    "item_fields": ("item_fields", list, "a list of {name, max_words[, format, history]} mappings"),
    "history_length": ("max_history", int, "an integer >= 1"),
    "instruction": ("system", str, "a text"),
    "history_header": ("history_header", str, "a text"),
    "query": ("query", str, "a text"),
    "label_format": ("label_format", str, "a text holding {label}"),
    "labels": ("labels", list, f"a list of texts or one of {sorted(LABEL_SETS)}"),
    "bos": ("bos", bool, "true or false"),
    "chat_template": ("chat_template", bool, "true or false"),
    "item_tokens": ("item_tokens", bool, "true or false"),
    "field_separator": ("field_separator", str, "a text"),
}
NEWLINE_ENDED = ("instruction", "history_header")  # a newline is added when missing (block boundary rule)


def load_template(path: str | Path) -> PromptTemplate:
    """The template a YAML file describes.

    Raises:
        TemplateError: the file is missing or not YAML, holds an unknown key, or a bad value.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise TemplateError(f"template file {path} could not be read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise TemplateError(f"template file {path} is not valid YAML: {exc}") from exc
    return template_from_mapping(data or {}, str(path))


def template_from_mapping(data: Mapping, source: str = "template") -> PromptTemplate:
    """:class:`PromptTemplate` from the YAML keys (:data:`KEYS`); ``source`` names it in errors."""
    if not isinstance(data, Mapping):
        raise TemplateError(f"{source} must hold a mapping of template keys, got {type(data).__name__}")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise TemplateError(f"{source}: unknown template key(s) {unknown}; known: {sorted(KEYS)}")
    values = {"item_tokens": False}
    for key, value in data.items():
        name, kind, expected = KEYS[key]
        if key == "labels" and isinstance(value, str):
            value = _label_set(value, source)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise TemplateError(f"{source}: {key} must be {expected}, got {value!r}")
        if key in NEWLINE_ENDED and not value.endswith("\n"):
            value += "\n"
        values[name] = value
    try:
        return PromptTemplate(**values)
    except ConfigError as exc:  # PromptTemplate's own checks (boundary rule, labels, item fields)
        raise TemplateError(f"{source}: {exc}") from exc


def resolve_template(template: str | Path | PromptTemplate) -> PromptTemplate:
    """A template given as a YAML path or as a :class:`PromptTemplate`."""
    return template if isinstance(template, PromptTemplate) else load_template(template)


def with_template(ranker, template: str | Path | PromptTemplate | None):
    """``ranker`` serving ``template`` instead of the one saved with it (``None``: unchanged).

    Raises:
        TemplateError: the ranker is an item-lm ranker, whose compiled label lookup is built for
            the template it was trained with, and ``template`` differs from that one.
    """
    if template is None:
        return ranker
    template = resolve_template(template)
    if ranker.training.get("recipe") == "item-lm" and template != ranker.template:
        raise TemplateError(
            "an item-lm ranker serves only the template it was trained with (its label lookup is "
            "compiled for that prompt layout); drop template= or train a verbalizer / fine-tuned ranker "
            "with `rcllm train --template`"
        )
    return replace(ranker, template=template)


def _label_set(name: str, source: str) -> list[str]:
    if name not in LABEL_SETS:
        raise TemplateError(f"{source}: labels {name!r} is not one of {sorted(LABEL_SETS)} (or give a list)")
    return list(LABEL_SETS[name])
