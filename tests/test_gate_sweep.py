"""The accuracy-gate sweep's round-3 pieces: the dense lookup task, mimetic init, a short run."""
import numpy as np
import torch

from rcllm_sdk.pipelines import gate_sweep as gs

N_ITEMS, LABEL0, NEWLINE, ITEM0 = 30, 10, 5, 100


def _data(rng) -> dict:
    """A tiny export in the format ``gate_sweep export`` writes: token ids of every prompt piece."""
    users = lambda n: [[ITEM0 + int(i), NEWLINE] for i in rng.integers(0, N_ITEMS, n)]  # noqa: E731
    rows = lambda n: [(sum(users(3), []), [int(c) for c in rng.permutation(N_ITEMS)[: gs.K]],  # noqa: E731
                       int(rng.integers(0, gs.K))) for _ in range(n)]
    return {
        "meta": {"vocab": ITEM0 + N_ITEMS, "pad": 0, "bos": 1, "eos": 2},
        "system": [3, 4, NEWLINE], "query": [6, 7, 8], "hint_prefix": [9], "hint_suffix": [6, 7, 8],
        "label_blocks": [[LABEL0 + k, NEWLINE] for k in range(gs.K)],
        "label_ids": [LABEL0 + k for k in range(gs.K)],
        "item_lines": [[ITEM0 + i, 40 + i % 7, NEWLINE] for i in range(N_ITEMS)],
        "item_tokens": [ITEM0 + i for i in range(N_ITEMS)],
        "item_vectors": torch.randn(N_ITEMS, 8, generator=torch.Generator().manual_seed(0)),
        "train": rows(40), "val": rows(12), "test": rows(12),
    }


def test_lookup_pairs_name_a_candidate_and_its_label():
    rng = np.random.default_rng(0)
    data = _data(rng)
    seqs, positions, targets, spans = gs.lookup_batch(data, rng, n=4, k=5, pairs=6)
    flat = iter(targets)
    for seq, pos, sp in zip(seqs, positions, spans):
        assert len(pos) == 6 and len(sp) == 5
        for p in pos:
            target = next(flat)
            item_token = seq[p]
            start, _ = sp[target]
            assert seq[start] == item_token  # the pair names candidate `target`'s item
            assert seq[start - 2] == data["label_ids"][target]  # whose label block precedes it
            assert seq[p + 1] == data["label_ids"][target]  # and the pair spells the answer after it


def test_mimetic_init_shares_query_and_key_projections_after_layer_0():
    model = gs.build_model(_data(np.random.default_rng(0)), "small", theta=1e6, mimetic=3.0)
    first = model.model.layers[0].self_attn
    assert not torch.equal(first.q_proj.weight[: first.head_dim], first.k_proj.weight[: first.head_dim])
    for layer in model.model.layers[1:]:
        attn, dim = layer.self_attn, layer.self_attn.head_dim
        per_kv = attn.q_proj.out_features // attn.k_proj.out_features  # query heads per KV head
        for q in range(attn.q_proj.out_features // dim):
            kv = q // per_kv
            assert torch.equal(attn.q_proj.weight[q * dim:(q + 1) * dim], attn.k_proj.weight[kv * dim:(kv + 1) * dim])
        rows = attn.k_proj.weight[:dim] / 3.0
        assert torch.allclose(rows @ rows.T, torch.eye(dim), atol=1e-5)  # orthonormal rows, scaled
    assert model.config.rope_parameters["rope_theta"] == 1e6


def test_round_3_training_runs_pretraining_then_ranking():
    rng = np.random.default_rng(0)
    data = _data(rng)
    cfg = {**gs.DEFAULTS, **gs.CONFIGS["lookup_mimetic_micro"], "steps": 6, "batch": 4}
    lines = []
    result = gs.train_one("tiny", cfg, data, budget=1.0, log=lines.append)
    assert result["steps"] == 6
    for split in ("val", "test"):
        assert 0.0 <= result[split]["ndcg10"] <= 1.0 and np.isfinite(result[split]["label_ce"])
    assert any("done steps 6" in line for line in lines)
