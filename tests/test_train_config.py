"""Training settings: per-recipe sections, precedence, the per-catalog choice of item features."""

from __future__ import annotations

import pytest

from rcllm_sdk.errors import ConfigError
from rcllm_sdk.pipelines.train_config import (
    ID_FEATURES_MIN_INTERACTIONS_PER_ITEM,
    TrainConfig,
    choose_item_features,
)


def test_precedence_defaults_file_environment_keywords(tmp_path, monkeypatch):
    config_file = tmp_path / "train.yaml"
    config_file.write_text("steps: 100\nlr: 0.01\nitem_lm_window: 12\n")
    assert TrainConfig.resolve().steps is None  # left to the recipe
    assert TrainConfig.resolve(config_file).steps == 100
    monkeypatch.setenv("RCLLM_TRAIN_STEPS", "200")
    monkeypatch.setenv("RCLLM_TRAIN_ITEM_FEATURES", "content")
    monkeypatch.setenv("RCLLM_BATCH_SIZE", "3")  # a serving setting: training never reads it
    config = TrainConfig.resolve(config_file)
    assert (config.steps, config.lr, config.item_lm.window, config.item_lm.features) == (
        200,
        0.01,
        12,
        "content",
    )
    assert config.batch_size == 64
    assert TrainConfig.resolve(config_file, steps=300, lr=None).steps == 300  # None: not given


def test_bad_settings_raise_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match="unknown training setting"):
        TrainConfig.resolve(stepz=3)
    with pytest.raises(ConfigError, match="recipe"):
        TrainConfig.resolve(recipe="magic")
    with pytest.raises(ConfigError, match="only for the verbalizer"):
        TrainConfig.resolve(recipe="item-lm", block_aware=True)
    with pytest.raises(ConfigError, match="pretrain_worlds"):
        TrainConfig.resolve(recipe="verbalizer", pretrain_worlds=2)
    monkeypatch.setenv("RCLLM_TRAIN_STEPS", "many")
    with pytest.raises(ConfigError, match="steps"):
        TrainConfig.resolve()


def test_item_features_are_chosen_per_catalog_and_explicit_flags_win():
    threshold = ID_FEATURES_MIN_INTERACTIONS_PER_ITEM
    assert choose_item_features(int(threshold * 400), 400)[0] == "id"
    assert choose_item_features(int(threshold * 400) - 1, 400)[0] == "content"
    dense = TrainConfig.resolve().for_catalog(270 * 3700, 3700)  # MovieLens-1M-like
    sparse = TrainConfig.resolve().for_catalog(35 * 400, 400)  # the demo's synthetic world
    assert (dense.item_lm.features, dense.size, dense.steps, dense.content.pretrain_worlds) == (
        "id",
        "small",
        2000,
        0,
    )
    assert dense.item_lm.patience == 3 and "270.0 training interactions per item >= 100" in dense.choice
    assert (sparse.item_lm.features, sparse.size, sparse.item_lm.patience) == ("content", "micro", 0)
    assert sparse.content.pretrain_worlds > 0
    given = TrainConfig.resolve(item_features="content", pretrain_worlds=0, steps=5).for_catalog(10**7, 10)
    assert (given.item_lm.features, given.content.pretrain_worlds, given.steps) == ("content", 0, 5)
    assert given.item_lm.patience == 3 and "given" in given.choice  # no worlds: early stopping stays on
    dense_with_worlds = TrainConfig.resolve(pretrain_worlds=4).for_catalog(270 * 3700, 3700)
    assert dense_with_worlds.content.pretrain_worlds == 0 and "not used" in dense_with_worlds.choice
    record = sparse.record()
    assert record["item_features"] == "content" and record["choice"] == sparse.choice
    assert "block_aware" not in record and "item_lm_window" in record


def test_the_verbalizer_record_keeps_its_own_flat_keys():
    record = TrainConfig.resolve(recipe="verbalizer", block_aware=True).for_catalog(10, 10).record()
    assert record["block_aware"] is True and record["size"] == "small" and "item_lm_window" not in record


def test_every_flag_of_the_product_commands_has_a_help_text():
    import argparse

    from rcllm_sdk.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    missing = [
        (name, action.option_strings)
        for name in ("ingest", "train", "recommend", "evaluate", "refresh", "place", "demo")
        for action in commands[name]._actions
        if not action.help and not isinstance(action, argparse._HelpAction)
    ]
    assert not missing
    assert "Round" not in commands["train"].format_help() and "README" not in commands["train"].format_help()
