"""Ingestion sources: identical splits from movielens and csv forms, and clear errors for bad rows."""

from pathlib import Path

import polars as pl
import pytest

from rcllm_sdk.data.sources import load
from rcllm_sdk.data.split import leave_one_out
from rcllm_sdk.errors import ConfigError, DataFormatError

SHARED_ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"

RATINGS = [
    (1, 10, 5, 300),
    (1, 11, 3, 100),
    (1, 12, 4, 200),
    (1, 13, 4, 400),
    (2, 10, 2, 50),
    (2, 12, 1, 60),
    (2, 13, 2, 70),
    (3, 11, 5, 10),
    (3, 10, 5, 10),
]
MOVIES = [
    (10, "Alpha (1995)", "0|1|0"),
    (11, "Beta (1996)", "1|0|0"),
    (12, "Gamma (1997)", "0|1|1"),
    (13, "Delta (1998)", "0|0|1"),
]
GENRES = ["Action", "Comedy", "Drama"]


def write_movielens(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS))
    (folder / "u.item").write_text(
        "".join(f"{i}|{title}|01-Jan-1995||http://x|{flags}\n" for i, title, flags in MOVIES),
        encoding="latin-1",
    )
    (folder / "u.genre").write_text("".join(f"{g}|{n}\n" for n, g in enumerate(GENRES)))


def write_csv(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "interactions.csv").write_text(
        "user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, _, t in RATINGS)
    )
    rows = []
    for i, title, flags in MOVIES:
        cats = "|".join(g for g, f in zip(GENRES, flags.split("|"), strict=False) if f == "1")
        rows.append(f'{i},"{title}",{cats}\n')
    (folder / "items.csv").write_text("item_id,title,category\n" + "".join(rows))


def test_movielens_and_csv_give_identical_splits(tmp_path):
    write_movielens(tmp_path / "ml")
    write_csv(tmp_path / "csv")
    a, b = load("movielens", tmp_path / "ml"), load("csv", tmp_path / "csv")
    assert leave_one_out(a.interactions).equals(leave_one_out(b.interactions))
    assert a.items.equals(b.items)
    split = leave_one_out(a.interactions).filter(pl.col("user_id") == 1)
    assert split["item_id"].to_list() == [11, 12, 10, 13]  # time order
    assert split["split"].to_list() == ["train", "train", "val", "test"]
    tie = leave_one_out(a.interactions).filter(pl.col("user_id") == 3)
    assert tie["item_id"].to_list() == [11, 10]  # equal timestamps keep file order
    assert tie["split"].to_list() == ["train", "train"]  # under 3 interactions: nothing held out


def test_real_movielens_100k_matches_its_csv_form_when_present():
    if not SHARED_ML100K.exists():  # the project must work without the shared data
        return
    a, b = load("movielens", SHARED_ML100K), load("csv", SHARED_ML100K)
    assert a.interactions.height == 100_000
    assert leave_one_out(a.interactions).equals(leave_one_out(b.interactions))


def test_malformed_row_names_file_line_and_column(tmp_path):
    write_csv(tmp_path)
    text = (tmp_path / "interactions.csv").read_text().replace("2,12,60", "2,twelve,60")
    (tmp_path / "interactions.csv").write_text(text)
    with pytest.raises(
        DataFormatError, match=r"interactions.csv:7: column 'item_id' has invalid value 'twelve'"
    ):
        load("csv", tmp_path)
    ds = load("csv", tmp_path, skip_bad_rows=True)
    assert ds.interactions.height == len(RATINGS) - 1
    assert sum(ds.skipped.values()) == 1


def test_unknown_item_and_missing_files_are_errors(tmp_path):
    write_csv(tmp_path)
    with open(tmp_path / "interactions.csv", "a") as f:
        f.write("4,99,5\n")
    with pytest.raises(DataFormatError, match="missing from items"):
        load("csv", tmp_path)
    with pytest.raises(DataFormatError, match="must hold interactions.csv"):
        load("csv", tmp_path.parent)
    with pytest.raises(DataFormatError, match="not a directory"):
        load("movielens", tmp_path / "absent")


def test_synthetic_is_deterministic_and_has_descriptions(tiny_world):
    from conftest import TINY
    from rcllm_sdk.data.synthetic import generate

    again = generate(TINY)
    assert again[0].equals(tiny_world[0]) and again[1].equals(tiny_world[1])
    interactions, items = tiny_world
    assert items["text"].str.split(" ").list.len().min() >= TINY.description_words
    lengths = interactions.group_by("user_id").len()["len"]
    assert lengths.min() >= TINY.min_len - 1 and lengths.max() <= TINY.max_len


def test_synthetic_habits_set_how_often_users_continue_a_series():
    from rcllm_sdk.data.synthetic import SyntheticConfig, generate

    def sequel_rate(habits):
        interactions, items = generate(
            SyntheticConfig(n_users=60, n_items=200, n_categories=4, seed=3, sequel_habits=habits)
        )
        title = dict(zip(items["item_id"], items["title"], strict=False))
        series = lambda i: title[i].rpartition(" Part ")  # noqa: E731
        steps = [
            (a, b)
            for seq in interactions.group_by("user_id", maintain_order=True).agg("item_id")["item_id"]
            for a, b in zip(seq[:-1], seq[1:], strict=False)
        ]
        nexts = [
            series(b)[0] == series(a)[0] and int(series(b)[2]) == int(series(a)[2]) + 1 for a, b in steps
        ]
        return sum(nexts) / len(nexts)

    assert sequel_rate((1.0,)) > 0.4 > 0.05 > sequel_rate((0.0,))
    with pytest.raises(ConfigError, match="sequel_habits"):
        SyntheticConfig(sequel_habits=(1.5,))
    with pytest.raises(ConfigError, match="stay_habits"):
        SyntheticConfig(stay_habits=())


def test_cli_passes_synthetic_habits_and_rejects_non_numbers():
    from rcllm_sdk.cli import _synthetic, build_parser

    parse = lambda *argv: build_parser().parse_args(["ingest", "--repo", "r", *argv])  # noqa: E731
    assert _synthetic(parse("--sequel-habits", "0.05,0.9")).sequel_habits == (0.05, 0.9)
    assert _synthetic(parse()).sequel_habits == (0.0, 0.3)
    with pytest.raises(SystemExit):
        parse("--stay-habits", "often")


def test_cli_passes_the_history_lm_weight_and_example_count_to_training():
    from rcllm_sdk.cli import _train_config, build_parser
    from rcllm_sdk.errors import ConfigError

    parse = lambda *argv: build_parser().parse_args(["evaluate", "--out", "x.json", *argv])  # noqa: E731
    assert _train_config(parse()).recipe == "item-lm"  # the default: the recipe that reads the history
    assert _train_config(parse("--recipe", "verbalizer")).verbalizer.history_lm_weight == 0.0
    weighted = _train_config(parse("--recipe", "verbalizer", "--history-lm-weight", "1.0"))
    assert weighted.verbalizer.history_lm_weight == 1.0
    with pytest.raises(ConfigError, match="only for the verbalizer"):
        _train_config(parse("--history-lm-weight", "1.0"))
    assert _train_config(parse()).max_examples == 20_000
    assert _train_config(parse("--max-examples", "100000")).max_examples == 100_000
    with pytest.raises(ConfigError, match="max_examples must be >= 1"):
        _train_config(parse("--max-examples", "0"))
