"""A deterministic synthetic catalog and interaction log whose next item follows from content.

Mechanism (documented in docs/data-and-feast.md):

* Items belong to one of ``n_categories`` categories and to a *series* inside it
  (``"<Series> Part N"``); each category has its own vocabulary for titles and descriptions.
  Popularity is Zipf-like over a random permutation of the items.
* Each user has a category preference (a sparse Dirichlet draw) and two habits drawn per user:
  ``p_sequel`` (how often they continue a series they are in) and ``p_stay`` (how often they
  stay in the category of their last item).
* Each next item is drawn, given the history, as: the next part of the last item's series
  with probability ``p_sequel`` (when it exists and is unseen); else an unseen item of the
  last item's category with probability ``p_stay``; else an unseen item of a category drawn
  from the user's preference. Within a category the choice is popularity-weighted.

The habits differ per user and can only be read off the history's content (does this user
follow series? stay in a category?), which a global blend of co-occurrence, similarity and
popularity cannot do per user: a content-reading ranker has something to learn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from ..errors import ConfigError

_CATEGORIES = [
    "Mystery",
    "Cooking",
    "Space",
    "Romance",
    "History",
    "Horror",
    "Sports",
    "Music",
    "Travel",
    "Comedy",
    "Science",
    "Fantasy",
    "Western",
    "Nature",
    "Crime",
    "Family",
    "Poetry",
    "Finance",
    "Health",
    "Gaming",
    "Design",
    "War",
    "Ocean",
    "Myth",
]
_SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ra",
    "ten",
    "vo",
    "shi",
    "dun",
    "pel",
    "qua",
    "zor",
    "bel",
    "nim",
    "tor",
    "fa",
    "gri",
    "ul",
    "ex",
    "an",
    "sol",
    "mer",
    "dra",
    "ko",
    "vin",
]
_GENERIC = ["story", "tale", "journey", "chronicle", "season", "guide", "legend", "saga"]


@dataclass(slots=True)
class SyntheticConfig:
    """Sizes and habits of the synthetic world; every draw comes from ``seed``."""

    n_users: int = 2500
    n_items: int = 1200
    n_categories: int = 12
    min_len: int = 6
    max_len: int = 40
    zipf_exponent: float = 0.9
    series_len: tuple[int, int] = (2, 6)
    description_words: int = 24
    sequel_habits: tuple[float, ...] = (0.0, 0.3)  # p_sequel of each user: one of these, uniformly
    stay_habits: tuple[float, ...] = (0.1, 0.7)  # p_stay of each user: one of these, uniformly
    seed: int = 7

    def __post_init__(self):
        if not 1 <= self.n_categories <= len(_CATEGORIES):
            raise ConfigError(f"n_categories must be in 1..{len(_CATEGORIES)}, got {self.n_categories}")
        if self.n_items < 10 * self.n_categories:
            raise ConfigError("n_items must be at least 10 per category")
        if not 3 <= self.min_len <= self.max_len:
            raise ConfigError("need 3 <= min_len <= max_len (leave-one-out takes two items)")
        for name in ("sequel_habits", "stay_habits"):
            values = tuple(float(v) for v in getattr(self, name))
            if not values or not all(0.0 <= v <= 1.0 for v in values):
                raise ConfigError(f"{name} must be one or more probabilities in [0, 1], got {values}")
            setattr(self, name, values)


def _word(rng: np.random.Generator, n_syllables: int) -> str:
    return "".join(rng.choice(_SYLLABLES, size=n_syllables)).capitalize()


def _category_vocab(rng, n_categories: int, size: int = 12) -> list[list[str]]:
    return [[_word(rng, 2).lower() for _ in range(size)] for _ in range(n_categories)]


def _build_items(cfg: SyntheticConfig, rng) -> tuple[pl.DataFrame, np.ndarray, np.ndarray]:
    """Items with category, series, part number, title and description text."""
    vocab = _category_vocab(rng, cfg.n_categories)
    category = rng.integers(0, cfg.n_categories, size=cfg.n_items)
    category.sort()
    rows, series_of, part_of = [], np.zeros(cfg.n_items, int), np.zeros(cfg.n_items, int)
    item, series_id = 0, 0
    while item < cfg.n_items:
        cat = category[item]
        length = int(rng.integers(cfg.series_len[0], cfg.series_len[1] + 1))
        name = f"{_word(rng, 2)} {rng.choice(_GENERIC).capitalize()}"
        part = 1
        while item < cfg.n_items and category[item] == cat and part <= length:
            words = rng.choice(vocab[cat], size=cfg.description_words)
            text = f"A {_CATEGORIES[cat].lower()} {' '.join(words)}."
            rows.append((item + 1, f"{name} Part {part}", _CATEGORIES[cat], text))
            series_of[item], part_of[item] = series_id, part
            item, part = item + 1, part + 1
        series_id += 1
    items = pl.DataFrame(rows, schema=["item_id", "title", "category", "text"], orient="row")
    return items, series_of, part_of


def _popularity(cfg: SyntheticConfig, rng) -> np.ndarray:
    ranks = rng.permutation(cfg.n_items) + 1
    weights = ranks.astype(float) ** -cfg.zipf_exponent
    return weights / weights.sum()


class _UserWalker:
    """Draws one user's sequence with the mechanism in the module docstring."""

    def __init__(self, category, series_of, part_of, popularity, rng):
        self.category, self.popularity, self.rng = category, popularity, rng
        self.by_category = [np.flatnonzero(category == c) for c in range(category.max() + 1)]
        self.sequel = np.full(len(category), -1)
        same_series_next = (series_of[1:] == series_of[:-1]) & (part_of[1:] == part_of[:-1] + 1)
        self.sequel[:-1][same_series_next] = np.flatnonzero(same_series_next) + 1

    def walk(self, length: int, preference: np.ndarray, p_sequel: float, p_stay: float) -> list[int]:
        seen: set[int] = set()
        seq = [self._pick(self._draw_category(preference), seen)]
        while len(seq) < length:
            last = seq[-1]
            nxt = self.sequel[last]
            if nxt >= 0 and nxt not in seen and self.rng.random() < p_sequel:
                choice = int(nxt)
                seen.add(choice)
            elif self.rng.random() < p_stay:
                choice = self._pick(self.category[last], seen)
            else:
                choice = self._pick(self._draw_category(preference), seen)
            if choice < 0:
                break
            seq.append(choice)
        return seq

    def _draw_category(self, preference) -> int:
        return int(self.rng.choice(len(preference), p=preference))

    def _pick(self, cat: int, seen: set[int]) -> int:
        pool = [i for i in self.by_category[cat] if i not in seen]
        if not pool:
            return -1
        weights = self.popularity[pool]
        choice = int(self.rng.choice(pool, p=weights / weights.sum()))
        seen.add(choice)
        return choice


def user_habits(cfg: SyntheticConfig, rng) -> tuple[float, float]:
    """One user's ``(p_sequel, p_stay)`` (two draws from ``rng``, whatever the values)."""
    return (
        float(cfg.sequel_habits[rng.integers(len(cfg.sequel_habits))]),
        float(cfg.stay_habits[rng.integers(len(cfg.stay_habits))]),
    )


def generate(cfg: SyntheticConfig | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Return ``(interactions, items)``: ``user_id,item_id,timestamp`` and ``item_id,title,category,text``.

    Example:
        >>> interactions, items = generate(SyntheticConfig(n_users=50, n_items=200, n_categories=5))
    """
    cfg = cfg or SyntheticConfig()
    rng = np.random.default_rng(cfg.seed)
    items, series_of, part_of = _build_items(cfg, rng)
    category = np.array([_CATEGORIES.index(c) for c in items["category"]])
    walker = _UserWalker(category, series_of, part_of, _popularity(cfg, rng), rng)
    users, item_ids, stamps = [], [], []
    start = 1_600_000_000
    for user in range(1, cfg.n_users + 1):
        preference = rng.dirichlet(np.full(cfg.n_categories, 0.25))
        p_sequel, p_stay = user_habits(cfg, rng)
        length = int(rng.integers(cfg.min_len, cfg.max_len + 1))
        seq = walker.walk(length, preference, p_sequel, p_stay)
        t0 = start + int(rng.integers(0, 86_400 * 30))
        users += [user] * len(seq)
        item_ids += [i + 1 for i in seq]
        stamps += [t0 + 3_600 * k for k in range(len(seq))]
    interactions = pl.DataFrame(
        {"user_id": users, "item_id": item_ids, "timestamp": stamps},
        schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64},
    )
    return interactions, items
