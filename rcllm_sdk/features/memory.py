"""In-memory feature source: user histories and item features from Python data or DataFrames.

:class:`MemoryFeatures` answers ``histories(user_ids)`` and ``items(item_ids)`` as
:class:`~rcllm_sdk.features.FeatureClient` does, from data held in the process, so a
recommender runs without Feast, polars, pandas or LMCache (``RcRecommender.from_frames``).

Accepted ``users`` (interactions):
    - ``{user_id: [item_id, ...]}``, each history oldest first;
    - a table of rows with ``user_id``, ``item_id`` and optionally ``timestamp`` (histories
      ordered by timestamp, else by row order): a pandas or polars DataFrame, a dict of columns,
      or a list of row dicts.

Accepted ``items`` (item features):
    - ``{item_id: {"title": ..., "category": ..., "text": ...}}``;
    - a table with ``item_id`` and any of ``title``, ``category``, ``text``, ``embedding``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import DataFormatError
from ..retrieval import Retriever, RetrieverConfig

TEXT_FIELDS = ("title", "category", "text")
EMBEDDING_DIM = 32  # co-occurrence embeddings when the items bring none (as `rcllm ingest` computes)


class MemoryFeatures:
    """Histories and item features held in memory, read like the Feast client reads its store.

    Example:
        >>> features = MemoryFeatures.from_data({1: [10, 11]}, {10: {"title": "A"}, 11: {"title": "B"}})
        >>> features.histories([1, 2])
        [([10, 11], [0, 1]), None]
    """

    def __init__(self, histories: dict[int, tuple[list[int], list[int]]], items: dict[int, dict]):
        self._histories, self._items = histories, items
        unknown = sorted({i for ids, _ in histories.values() for i in ids} - set(items))
        if unknown:
            raise DataFormatError(
                f"histories name {len(unknown)} item id(s) missing from the items, e.g. {unknown[:5]}; "
                "give every interacted item a row of item features"
            )

    @classmethod
    def from_data(cls, users, items) -> MemoryFeatures:
        """From the accepted forms of ``users`` and ``items`` (module docstring)."""
        return cls(_histories(users), _items(items))

    @property
    def item_ids(self) -> list[int]:
        return list(self._items)

    def sequences(self) -> list[list[int]]:
        """Every user's history, oldest first (what the retriever is fitted on)."""
        return [ids for ids, _ in self._histories.values()]

    def histories(self, user_ids: list[int]) -> list[tuple[list[int], list[int]] | None]:
        """``(item_ids, timestamps)`` per user, oldest first; ``None`` for an unknown user."""
        found = [self._histories.get(int(u)) for u in user_ids]
        return [None if h is None else (list(h[0]), list(h[1])) for h in found]

    def items(self, item_ids: list[int]) -> dict[str, list]:
        """Columns ``title, category, text, embedding`` for ``item_ids`` (``None`` where unknown)."""
        rows = [self._items.get(int(i)) for i in item_ids]
        return {
            name: [None if row is None else row.get(name) for row in rows]
            for name in (*TEXT_FIELDS, "embedding")
        }

    def embeddings(self, dim: int = EMBEDDING_DIM) -> np.ndarray:
        """One vector per item (catalog order): the items' own ``embedding`` where every item has
        one, else co-occurrence embeddings of the histories (zeros where scipy is not installed)."""
        given = [row.get("embedding") for row in self._items.values()]
        if all(v is not None for v in given) and given:
            return np.asarray([np.asarray(v, np.float32) for v in given])
        try:
            from ..data.embeddings import item_embeddings
        except ImportError:  # scipy missing: the retriever blends transitions and popularity only
            return np.zeros((len(self._items), 1), np.float32)
        index = {i: n for n, i in enumerate(self._items)}
        dense = [np.array([index[i] for i in ids], np.int64) for ids in self.sequences()]
        return item_embeddings(dense, len(self._items), dim)


def in_memory(users, items, model, template, config_file, config: dict, retriever=None):
    """``(features, retriever, ranker, settings)`` of ``RcRecommender.from_frames``: the block store
    defaults to ``memory://`` unless the file, ``RCLLM_STORE`` or ``config`` names one."""
    from ..config import RecommenderConfig, read_yaml_mapping
    from ..model.ranker import Ranker, load_ranker
    from ..prompt.template_file import with_template

    features = MemoryFeatures.from_data(users, items)
    named = config.get("store") or os.environ.get("RCLLM_STORE")
    if not named and not (config_file and "store" in read_yaml_mapping(Path(config_file), "config")):
        config = {**config, "store": "memory://"}
    settings = RecommenderConfig.resolve(config_file, **config)
    if not isinstance(retriever, Retriever):
        retriever = Retriever.fit(
            features.sequences(), features.item_ids, features.embeddings(), retriever or RetrieverConfig()
        )
    ranker = (
        model
        if isinstance(model, Ranker)
        else load_ranker(model, dtype=settings.dtype, device=settings.device)
    )
    return features, retriever, with_template(ranker, template), settings


def _histories(users) -> dict[int, tuple[list[int], list[int]]]:
    if isinstance(users, Mapping) and not {"user_id", "item_id"} <= set(users):
        out = {}
        for user, ids in users.items():
            if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence | np.ndarray):
                raise DataFormatError(f"user {user!r}: expected a list of item ids, got {type(ids).__name__}")
            ids = [_int(i, f"user {user!r} item id") for i in ids]
            out[_int(user, "user id")] = (ids, list(range(len(ids))))
        return out
    cols = _columns(users, "users", ("user_id", "item_id"))
    stamps = cols.get("timestamp") or list(range(len(cols["user_id"])))
    rows = sorted(
        zip(cols["user_id"], stamps, range(len(stamps)), cols["item_id"], strict=True),
        key=lambda r: (_int(r[0], "user_id"), r[1], r[2]),
    )
    out: dict[int, tuple[list[int], list[int]]] = {}
    for user, stamp, _, item in rows:
        ids, times = out.setdefault(int(user), ([], []))
        ids.append(_int(item, "item_id"))
        times.append(_seconds(stamp))
    return out


def _items(items) -> dict[int, dict]:
    if isinstance(items, Mapping) and "item_id" not in items:
        out = {}
        for item, row in items.items():
            if not isinstance(row, Mapping):
                raise DataFormatError(f"item {item!r}: expected a mapping of item features, got {row!r}")
            out[_int(item, "item id")] = _item_row(row)
        return out
    cols = _columns(items, "items", ("item_id",))
    names = [n for n in (*TEXT_FIELDS, "embedding") if n in cols]
    return {
        _int(item, "item_id"): _item_row({n: cols[n][r] for n in names})
        for r, item in enumerate(cols["item_id"])
    }


def _item_row(row: Mapping) -> dict:
    out = {name: "" if row.get(name) is None else str(row[name]) for name in TEXT_FIELDS}
    out["embedding"] = row.get("embedding")
    return out


def _columns(table, what: str, required: tuple[str, ...]) -> dict[str, list]:
    """``{column: values}`` of a pandas/polars DataFrame, a dict of columns or a list of row dicts."""
    module = type(table).__module__.split(".")[0]
    if module == "pandas":
        cols = table.to_dict(orient="list")
    elif module == "polars":
        cols = table.to_dict(as_series=False)
    elif isinstance(table, Mapping):
        cols = {k: list(v) for k, v in table.items()}
    elif isinstance(table, Sequence) and all(isinstance(r, Mapping) for r in table):
        keys = list(dict.fromkeys(k for r in table for k in r))
        cols = {k: [r.get(k) for r in table] for k in keys}
    else:
        raise DataFormatError(
            f"{what}: expected a DataFrame, a dict or a list of rows, got {type(table).__name__}"
        )
    missing = [c for c in required if c not in cols]
    if missing:
        raise DataFormatError(f"{what}: missing column(s) {missing}; columns are {sorted(cols)}")
    return cols


def _seconds(stamp) -> int:
    """A timestamp as integer seconds (numbers as given; datetimes and pandas Timestamps converted)."""
    return int(stamp.timestamp()) if hasattr(stamp, "timestamp") else int(stamp)


def _int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise DataFormatError(f"{what} must be an integer, got {value!r}")
    return int(value)
