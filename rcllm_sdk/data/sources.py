"""Readers for the three ingestion sources: synthetic, MovieLens-100K originals, and plain CSV.

Every reader returns a :class:`Dataset` with the same two tables. Malformed rows raise
:class:`DataFormatError` naming the file, line and column, or, with ``skip_bad_rows=True``,
are counted in ``Dataset.skipped`` and left out; nothing is dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from ..errors import DataFormatError
from .synthetic import SyntheticConfig, generate

INTERACTION_SCHEMA = {"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64}
ITEM_SCHEMA = {"item_id": pl.Int64, "title": pl.Utf8, "category": pl.Utf8, "text": pl.Utf8}


@dataclass(slots=True)
class Dataset:
    """Interactions sorted by user then time (ties keep file order) and the item catalog."""

    name: str
    interactions: pl.DataFrame  # user_id, item_id, timestamp
    items: pl.DataFrame  # item_id, title, category, text
    skipped: dict[str, int] = field(default_factory=dict)


def load(
    source: str,
    path: str | Path | None = None,
    *,
    skip_bad_rows: bool = False,
    synthetic: SyntheticConfig | None = None,
) -> Dataset:
    """Load ``source`` (``synthetic``, ``movielens`` or ``csv``) into a :class:`Dataset`.

    Example:
        >>> ds = load("csv", "../shared/data/ml-100k")
    """
    if source == "synthetic":
        interactions, items = generate(synthetic)
        return checked_dataset("synthetic", interactions, items, {})
    if path is None:
        raise DataFormatError(f"source {source!r} needs --path DIR")
    folder = Path(path)
    if not folder.is_dir():
        raise DataFormatError(f"{folder} is not a directory; pass the folder holding the {source} files")
    if source == "movielens":
        return _load_movielens(folder, skip_bad_rows)
    if source == "csv":
        return _load_csv(folder, skip_bad_rows)
    raise DataFormatError(f"unknown source {source!r}; use synthetic, movielens or csv")


def _load_movielens(folder: Path, skip: bool) -> Dataset:
    data, item_file = folder / "u.data", folder / "u.item"
    for f in (data, item_file):
        if not f.exists():
            raise DataFormatError(f"{f} not found: the movielens source reads the original u.data and u.item")
    skipped: dict[str, int] = {}
    raw = pl.read_csv(
        data,
        separator="\t",
        has_header=False,
        infer_schema=False,
        new_columns=["user_id", "item_id", "rating", "timestamp"],
    )
    interactions = _typed(raw.drop("rating"), INTERACTION_SCHEMA, data, 1, skip, skipped)
    text = item_file.read_bytes().decode("latin-1")
    rows = [line.split("|") for line in text.splitlines() if line.strip()]
    genres = _movielens_genres(folder)
    parsed = []
    for lineno, row in enumerate(rows, start=1):
        if len(row) < 5 + len(genres):
            if skip:
                skipped[str(item_file)] = skipped.get(str(item_file), 0) + 1
                continue
            raise DataFormatError(
                f"{item_file}:{lineno}: expected {5 + len(genres)} '|'-separated fields, got {len(row)}"
            )
        flags = row[-len(genres) :]
        category = "|".join(g for g, f in zip(genres, flags, strict=False) if f == "1")
        parsed.append((row[0], row[1], category))
    items = pl.DataFrame(parsed, schema=["item_id", "title", "category"], orient="row")
    items = _typed(
        items, {k: ITEM_SCHEMA[k] for k in ("item_id", "title", "category")}, item_file, 1, skip, skipped
    )
    return checked_dataset(folder.name, interactions, items, skipped)


def _movielens_genres(folder: Path) -> list[str]:
    genre_file = folder / "u.genre"
    if not genre_file.exists():
        raise DataFormatError(f"{genre_file} not found: needed to name the genre flags of u.item")
    lines = [
        line.split("|")[0] for line in genre_file.read_text(encoding="latin-1").splitlines() if line.strip()
    ]
    return lines


def _load_csv(folder: Path, skip: bool) -> Dataset:
    inter_file = next(
        (folder / n for n in ("interactions.csv", "interactions.csv.gz") if (folder / n).exists()), None
    )
    item_file = folder / "items.csv"
    if inter_file is None or not item_file.exists():
        raise DataFormatError(f"{folder} must hold interactions.csv (or .csv.gz) and items.csv")
    skipped: dict[str, int] = {}
    raw = _read_csv(inter_file)
    _require_columns(raw, INTERACTION_SCHEMA, inter_file)
    interactions = _typed(
        raw.select(list(INTERACTION_SCHEMA)), INTERACTION_SCHEMA, inter_file, 2, skip, skipped
    )
    raw_items = _read_csv(item_file)
    _require_columns(raw_items, {k: None for k in ("item_id", "title", "category")}, item_file)
    wanted = [c for c in ITEM_SCHEMA if c in raw_items.columns]
    items = _typed(raw_items.select(wanted), {c: ITEM_SCHEMA[c] for c in wanted}, item_file, 2, skip, skipped)
    return checked_dataset(folder.name, interactions, items, skipped)


def _read_csv(file: Path) -> pl.DataFrame:
    """Every column as text; an empty file is a DataFormatError, not polars' NoDataError."""
    try:
        return pl.read_csv(file, infer_schema=False)
    except pl.exceptions.NoDataError as exc:
        raise DataFormatError(f"{file} is empty; it needs a header line and at least one row") from exc


def _require_columns(frame: pl.DataFrame, schema: dict, file: Path) -> None:
    missing = [c for c in schema if c not in frame.columns]
    if missing:
        raise DataFormatError(f"{file}: missing column(s) {missing}; found {frame.columns}")


def _typed(
    frame: pl.DataFrame, schema: dict, file: Path, first_line: int, skip: bool, skipped: dict[str, int]
) -> pl.DataFrame:
    """Cast string columns to ``schema``; a value that does not parse is an error or a counted skip."""
    flags = [_bad_cell(c, d).alias(f"_bad_{c}") for c, d in schema.items()]
    checked = frame.with_row_index("_line", offset=first_line).with_columns(flags)
    checked = checked.with_columns(pl.any_horizontal(*[f"_bad_{c}" for c in schema]).alias("_bad"))
    n_bad = int(checked["_bad"].sum())
    if n_bad and not skip:
        row = checked.filter(pl.col("_bad")).row(0, named=True)
        col = next(c for c in schema if row[f"_bad_{c}"])
        raise DataFormatError(
            f"{file}:{row['_line']}: column {col!r} has invalid value {row[col]!r} "
            f"(expected {_dtype_name(schema[col])}); fix the file or pass --skip-bad-rows"
        )
    if n_bad:
        skipped[str(file)] = skipped.get(str(file), 0) + n_bad
    casts = [pl.col(c).str.strip_chars().cast(d) if d != pl.Utf8 else pl.col(c) for c, d in schema.items()]
    return checked.filter(~pl.col("_bad")).select(casts)


def _bad_cell(col: str, dtype) -> pl.Expr:
    if dtype == pl.Utf8:
        return pl.col(col).is_null() if col in ("item_id", "title") else pl.lit(False)
    return pl.col(col).is_null() | pl.col(col).str.strip_chars().cast(dtype, strict=False).is_null()


def _dtype_name(dtype) -> str:
    return "an integer" if dtype == pl.Int64 else "text"


def checked_dataset(
    name: str, interactions: pl.DataFrame, items: pl.DataFrame, skipped: dict[str, int]
) -> Dataset:
    """The :class:`Dataset` of loaded tables, refused when either holds no rows (item ids checked)."""
    for table, frame in (("interactions", interactions), ("items", items)):
        if frame.height == 0:
            raise DataFormatError(
                f"{name}: no {table} rows (after {sum(skipped.values())} skipped); nothing to ingest"
            )
    if "text" not in items.columns:
        items = items.with_columns(pl.lit("").alias("text"))
    items = items.with_columns(pl.col("category").fill_null(""), pl.col("text").fill_null(""))
    dup = items.filter(pl.col("item_id").is_duplicated())
    if dup.height:
        raise DataFormatError(
            f"items: item_id {dup['item_id'][0]} appears more than once; ids must be unique"
        )
    unknown = interactions.join(items.select("item_id"), on="item_id", how="anti")
    if unknown.height:
        raise DataFormatError(
            f"interactions reference {unknown.height} rows of item ids missing from items "
            f"(first: {unknown['item_id'][0]}); add them to items.csv"
        )
    interactions = (
        interactions.with_row_index("_order").sort(["user_id", "timestamp", "_order"]).drop("_order")
    )
    first_only = interactions.unique(["user_id", "item_id"], keep="first", maintain_order=True)
    if first_only.height < interactions.height:  # a repeat would leak the test item into the history
        skipped["repeat interactions (first kept)"] = interactions.height - first_only.height
    return Dataset(name, first_only, items.select(list(ITEM_SCHEMA)).sort("item_id"), skipped)
