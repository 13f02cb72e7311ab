"""Leave-one-out split per user: last item = test, second-last = validation, the rest = train.

Users with fewer than three interactions have no test or validation item (all train). The
split is a column of the ingested interaction table, so every later stage reads it from one
place and training never sees a test item.
"""

from __future__ import annotations

import polars as pl

TRAIN, VAL, TEST = "train", "val", "test"


def leave_one_out(interactions: pl.DataFrame) -> pl.DataFrame:
    """Add ``position`` (0-based within the user, in time order) and ``split`` columns.

    ``interactions`` must be sorted by user then time (as :func:`sources.load` returns it).
    """
    with_pos = interactions.with_columns(
        pl.int_range(pl.len()).over("user_id").alias("position"),
        pl.len().over("user_id").alias("_n"),
    )
    split = (
        pl.when(pl.col("_n") < 3)
        .then(pl.lit(TRAIN))
        .when(pl.col("position") == pl.col("_n") - 1)
        .then(pl.lit(TEST))
        .when(pl.col("position") == pl.col("_n") - 2)
        .then(pl.lit(VAL))
        .otherwise(pl.lit(TRAIN))
    )
    return with_pos.with_columns(split.alias("split")).drop("_n")


def histories(interactions: pl.DataFrame, exclude: tuple[str, ...] = (TEST,)) -> pl.DataFrame:
    """Per-user item and timestamp lists in time order, leaving out the ``exclude`` splits.

    The serving/evaluation view excludes only the test item: the history a test prompt sees
    ends with the validation item.
    """
    kept = interactions.filter(~pl.col("split").is_in(list(exclude)))
    return (
        kept.sort(["user_id", "position"])
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("item_id").alias("item_ids"), pl.col("timestamp").alias("timestamps"))
    )
