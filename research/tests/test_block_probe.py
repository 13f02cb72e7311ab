"""The block-reuse probe (research/block_probe.py) builds served-layout prompts and a complete report."""


def test_block_probe_prompts_and_report():
    """The probe's prompts have the served block layout, its ``full`` policy scores as the HF
    forward on them (so its other rows measure reuse, nothing else), and the report is complete."""
    import numpy as np
    import torch

    from rcllm_sdk.cache import open_store
    from rcllm_sdk.model.ranker import Ranker
    from rcllm_sdk.model.scoring import score_full
    from rcllm_sdk.runtime.engine import BlockEngine
    from research.block_probe import LABEL0, POLICIES, ProbeConfig, build_model, make_prompt, markdown, run

    cfg = ProbeConfig(candidates=3, item_tokens=4, hidden=32, layers=1, steps=3, eval_prompts=20)
    rng = np.random.default_rng(0)
    prompt, target = make_prompt(rng, cfg)
    assert [b.kind for b in prompt.blocks] == ["system", "user"] + ["label", "item"] * 3 + ["query"]
    assert prompt.blocks[3 + 2 * target].token_ids == prompt.blocks[1].token_ids[1:]  # the wanted item
    assert prompt.blocks[2 + 2 * target].token_ids == (LABEL0 + target,)

    model, prompts = build_model(cfg).eval(), [make_prompt(rng, cfg)[0] for _ in range(4)]
    labels = [list(range(LABEL0, LABEL0 + 3))] * 4
    with open_store("memory://", "probe") as store:
        served = BlockEngine(
            Ranker(model, None, None, "probe"), store, "full", backend="torch", guard=False
        ).score(prompts, labels)
    for got, want in zip(
        served, score_full(model, [p.input_ids for p in prompts], labels, pad_id=0), strict=False
    ):
        assert torch.allclose(got.logits, want, atol=1e-4)

    report = run(cfg, progress=False)
    for model_report in report["models"].values():
        results = model_report["results"]
        assert set(results) == {"hf_forward", *POLICIES}
        assert all(0 <= r["accuracy"] <= 1 for r in results.values())
        assert results["none"]["recompute_fraction"] < results["block_head:2"]["recompute_fraction"] < 1.0
    assert "| none |" in markdown(report)
