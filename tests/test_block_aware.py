"""Block-aware fine-tuning: the training mask has the structure the server reuses blocks with."""
import pytest
import torch

from rcllm_sdk.pipelines.block_mask import block_attention_mask


def test_block_mask_matches_the_served_structure():
    layout = [("system", 2), ("user", 2), ("label", 1), ("item", 2), ("query", 1)]
    mask = block_attention_mask([layout, layout[:2]], 10)
    expected = torch.tensor([
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
    ], dtype=torch.bool)
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

    with pytest.raises(ValueError, match="block_aware_fraction"):
        TrainConfig(block_aware=True, block_aware_fraction=0.0)
    config = TrainConfig(size="micro", steps=3, batch_size=2, vocab_size=600, block_aware=True,
                         block_aware_fraction=0.5)
    result = train_from_repo(ingested_repo, tmp_path / "ranker", config, progress=False, log_mlflow=False)
    assert result["summary"]["block_aware"] is True and (tmp_path / "ranker" / "config.json").exists()
    from rcllm_sdk.model.ranker import fingerprint, load_ranker

    loaded = load_ranker(tmp_path / "ranker")  # the folder says how its model was trained
    assert loaded.training["block_aware"] is True and loaded.training["block_aware_fraction"] == 0.5
    assert loaded.training["steps"] == 3
    assert loaded.fingerprint == fingerprint(tmp_path / "ranker")


def test_block_probe_prompts_and_report():
    """The probe's prompts have the served block layout, its ``full`` policy scores as the HF
    forward on them (so its other rows measure reuse, nothing else), and the report is complete."""
    import numpy as np

    from rcllm_sdk.cache import open_store
    from rcllm_sdk.evaluation.block_probe import LABEL0, POLICIES, ProbeConfig, build_model, make_prompt, markdown, run
    from rcllm_sdk.model.ranker import Ranker
    from rcllm_sdk.model.scoring import score_full
    from rcllm_sdk.runtime.engine import BlockEngine

    cfg = ProbeConfig(candidates=3, item_tokens=4, hidden=32, layers=1, steps=3, eval_prompts=20)
    rng = np.random.default_rng(0)
    prompt, target = make_prompt(rng, cfg)
    assert [b.kind for b in prompt.blocks] == ["system", "user"] + ["label", "item"] * 3 + ["query"]
    assert prompt.blocks[3 + 2 * target].token_ids == prompt.blocks[1].token_ids[1:]  # the wanted item
    assert prompt.blocks[2 + 2 * target].token_ids == (LABEL0 + target,)

    model, prompts = build_model(cfg).eval(), [make_prompt(rng, cfg)[0] for _ in range(4)]
    labels = [list(range(LABEL0, LABEL0 + 3))] * 4
    with open_store("memory://", "probe") as store:
        served = BlockEngine(Ranker(model, None, None, "probe"), store, "full", backend="torch").score(prompts, labels)
    for got, want in zip(served, score_full(model, [p.input_ids for p in prompts], labels, pad_id=0)):
        assert torch.allclose(got.logits, want, atol=1e-4)

    report = run(cfg, progress=False)
    for model_report in report["models"].values():
        results = model_report["results"]
        assert set(results) == {"hf_forward", *POLICIES}
        assert all(0 <= r["accuracy"] <= 1 for r in results.values())
        assert results["none"]["recompute_fraction"] < results["block_head:2"]["recompute_fraction"] < 1.0
    assert "| none |" in markdown(report)
