"""Block-aware fine-tuning: the training mask has the structure the server reuses blocks with."""

import pytest
import torch

from rcllm_sdk.errors import ConfigError
from rcllm_sdk.pipelines.block_mask import block_attention_mask


def test_block_mask_matches_the_served_structure():
    layout = [("system", 2), ("user", 2), ("label", 1), ("item", 2), ("query", 1)]
    mask = block_attention_mask([layout, layout[:2]], 10)
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # system: causal
            [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # user: system + itself
            [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],  # label (fresh): everything before it
            [1, 1, 0, 0, 0, 1, 0, 0, 0, 0],  # item: system + itself, not the user block or label
            [1, 1, 0, 0, 0, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 1, 0, 0],  # query (fresh): everything
            [0, 0, 0, 0, 0, 0, 0, 0, 1, 0],  # padding: itself only
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert mask.shape == (2, 1, 10, 10)
    assert torch.equal(mask[0, 0], expected)
    assert mask[1, 0, 4:, 4:].equal(torch.eye(6, dtype=torch.bool))  # the shorter prompt's padding


def test_mixed_training_gives_some_prompts_plain_causal_attention():
    import numpy as np

    from rcllm_sdk.pipelines.block_mask import mixed_layouts, with_full_attention

    layout = [("system", 2), ("user", 2), ("label", 1), ("item", 2), ("query", 1)]
    full = block_attention_mask([with_full_attention(layout)], 10)[0, 0]
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    assert torch.equal(full[:8, :8], causal) and not full[:8, 8:].any()  # causal over the prompt
    assert full[8:, 8:].equal(torch.eye(2, dtype=torch.bool))  # padding as before
    rng = np.random.default_rng(0)
    assert mixed_layouts([layout] * 3, 1.0, rng) == [layout] * 3
    mixed = mixed_layouts([layout] * 400, 0.5, rng)
    assert all(m in (layout, with_full_attention(layout)) for m in mixed)
    assert 150 < sum(m == layout for m in mixed) < 250


def test_block_aware_training_runs_and_saves(ingested_repo, tmp_path):
    from rcllm_sdk.pipelines.run import train_from_repo
    from rcllm_sdk.pipelines.train import TrainConfig

    with pytest.raises(ConfigError, match="block_aware_fraction"):
        TrainConfig.resolve(recipe="verbalizer", block_aware=True, block_aware_fraction=0.0)
    config = TrainConfig.resolve(
        recipe="verbalizer",
        size="micro",
        steps=3,
        batch_size=2,
        vocab_size=600,
        block_aware=True,
        block_aware_fraction=0.5,
    )
    result = train_from_repo(ingested_repo, tmp_path / "ranker", config, progress=False, log_mlflow=False)
    assert result["summary"]["block_aware"] is True and (tmp_path / "ranker" / "config.json").exists()
    from rcllm_sdk.model.ranker import fingerprint, load_ranker

    loaded = load_ranker(tmp_path / "ranker")  # the folder says how its model was trained
    assert loaded.training["block_aware"] is True and loaded.training["block_aware_fraction"] == 0.5
    assert loaded.training["steps"] == 3
    assert loaded.fingerprint == fingerprint(tmp_path / "ranker")
