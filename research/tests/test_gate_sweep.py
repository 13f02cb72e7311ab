"""The accuracy-gate sweep's pieces: the isolated lookup task, mimetic and label-head inits, a short run."""

import numpy as np
import pytest
import torch

from research import gate_sweep as gs

N_ITEMS, LABEL0, NEWLINE, ITEM0 = 30, 10, 5, 100


def _data(rng) -> dict:
    """A tiny export in the format ``gate_sweep export`` writes: token ids of every prompt piece."""

    def users(n):
        return [[ITEM0 + int(i), NEWLINE] for i in rng.integers(0, N_ITEMS, n)]

    def rows(n):
        return [
            (
                sum(users(3), []),
                [int(c) for c in rng.permutation(N_ITEMS)[: gs.K]],
                int(rng.integers(0, gs.K)),
            )
            for _ in range(n)
        ]

    return {
        "meta": {"vocab": ITEM0 + N_ITEMS, "pad": 0, "bos": 1, "eos": 2},
        "system": [3, 4, NEWLINE],
        "query": [6, 7, 8],
        "hint_prefix": [9],
        "hint_suffix": [6, 7, 8],
        "label_blocks": [[LABEL0 + k, NEWLINE] for k in range(gs.K)],
        "label_ids": [LABEL0 + k for k in range(gs.K)],
        "item_lines": [[ITEM0 + i, 40 + i % 7, NEWLINE] for i in range(N_ITEMS)],
        "item_tokens": [ITEM0 + i for i in range(N_ITEMS)],
        "item_vectors": torch.randn(N_ITEMS, 8, generator=torch.Generator().manual_seed(0)),
        "train": rows(40),
        "val": rows(12),
        "test": rows(12),
    }


def test_lookup_queries_name_a_candidate_after_its_label():
    rng = np.random.default_rng(0)
    data = _data(rng)
    seqs, positions, targets, spans = gs.lookup_batch(data, rng, n=4, k=5, pairs=6)
    flat = iter(targets)
    for seq, pos, sp in zip(seqs, positions, spans, strict=False):
        assert len(pos) == 6 and len(sp) == 5 and pos == list(range(len(seq) - 6, len(seq)))
        for p in pos:
            target = next(flat)
            start, _ = sp[target]
            assert seq[start] == seq[p]  # the query names candidate `target`'s item
            assert seq[start - 2] == data["label_ids"][target]  # whose label block precedes it
        assert not set(seq[pos[0] :]) & set(data["label_ids"])  # no answer is spelled after the prompt


def test_lookup_queries_cannot_see_each_other():
    mask, positions = gs.isolated_queries(torch.tensor([7, 5]), [4, 3], width=7)
    first = mask[0, 0]
    assert (
        first[:4, :4].equal(torch.ones(4, 4, dtype=torch.bool).tril()) and not first[:4, 4:].any()
    )  # causal
    for q in range(4, 7):
        assert first[q, :4].all() and first[q, q] and first[q, 4:].sum() == 1  # prompt + itself only
    assert positions[0].tolist() == [0, 1, 2, 3, 4, 4, 4]
    assert mask[1, 0, 5:].equal(torch.eye(7, dtype=torch.bool)[5:])  # padding rows: themselves only
    # in the model: changing one query leaves every other query's output unchanged
    data = _data(np.random.default_rng(0))
    model = gs.build_model(data, "micro").eval()
    seqs, pos, _, _ = gs.lookup_batch(data, np.random.default_rng(1), n=1, k=5, pairs=3)
    other = [list(seqs[0]) for _ in range(2)]
    other[1][pos[0][1]] = data["item_tokens"][-1]
    states = []
    for seq in other:
        ids, _, lengths = gs.pad([seq], 0, torch.device("cpu"))
        mask, position_ids = gs.isolated_queries(lengths, [pos[0][0]], ids.shape[1])
        with torch.no_grad():
            states.append(
                model.model(input_ids=ids, attention_mask=mask, position_ids=position_ids).last_hidden_state
            )
    for p in (pos[0][0], pos[0][2]):
        assert torch.allclose(states[0][0, p], states[1][0, p], atol=1e-6)
    assert not torch.allclose(states[0][0, pos[0][1]], states[1][0, pos[0][1]])


def test_label_head_init_attends_from_each_item_token_to_its_label():
    data = _data(np.random.default_rng(0))
    model = gs.build_model(data, "micro", label_head=12.0, item_scale=1e-4).eval()  # as in round 4
    model.config._attn_implementation = "eager"
    user, cands, _ = data["test"][0]
    spans = []
    ids = torch.tensor([gs.prompt_ids(data, user, cands, None, spans)])
    with torch.no_grad():
        attention = model.model(input_ids=ids, output_attentions=True).attentions[0][0, 0]  # layer 0, head 0
    to_label = torch.stack([attention[start, start - 2] for start, _ in spans])
    assert (to_label > 0.98).all(), to_label
    others = [attention[s, s - 1] for s, _ in spans] + [attention[s, s] for s, _ in spans]
    assert max(float(x) for x in others) < 0.05


def test_mimetic_init_shares_query_and_key_projections_after_layer_0():
    model = gs.build_model(_data(np.random.default_rng(0)), "small", theta=1e6, mimetic=3.0)
    first = model.model.layers[0].self_attn
    assert not torch.equal(first.q_proj.weight[: first.head_dim], first.k_proj.weight[: first.head_dim])
    for layer in model.model.layers[1:]:
        attn, dim = layer.self_attn, layer.self_attn.head_dim
        per_kv = attn.q_proj.out_features // attn.k_proj.out_features  # query heads per KV head
        for q in range(attn.q_proj.out_features // dim):
            kv = q // per_kv
            assert torch.equal(
                attn.q_proj.weight[q * dim : (q + 1) * dim], attn.k_proj.weight[kv * dim : (kv + 1) * dim]
            )
        rows = attn.k_proj.weight[:dim] / 3.0
        assert torch.allclose(rows @ rows.T, torch.eye(dim), atol=1e-5)  # orthonormal rows, scaled
    assert model.config.rope_parameters["rope_theta"] == 1e6


@pytest.mark.parametrize("name", ["lookup_mimetic_micro", "labelhead_micro3", "recall_labelhead_micro3"])
def test_lookup_rounds_train_pretraining_then_ranking(name):
    rng = np.random.default_rng(0)
    data = _data(rng)
    cfg = {**gs.DEFAULTS, **gs.CONFIGS[name], "steps": 6, "batch": 4}
    lines = []
    result = gs.train_one("tiny", cfg, data, budget=1.0, log=lines.append)
    assert result["steps"] == 6
    for split in ("val", "test"):
        assert 0.0 <= result[split]["ndcg10"] <= 1.0 and np.isfinite(result[split]["label_ce"])
    assert any("done steps 6" in line for line in lines)


def test_k_schedule_starts_after_lookup_pretraining():
    k_at = lambda cfg, p: gs.schedules({**gs.DEFAULTS, **cfg}, p)[1]  # noqa: E731
    after_lookup = dict(pretrain=0.4, k_end=0.9)
    assert [k_at(after_lookup, p) for p in (0.0, 0.4, 0.65, 0.9, 1.0)] == [2, 2, 11, 20, 20]
    assert [k_at(dict(k_end=0.5), p) for p in (0.0, 0.25, 0.5)] == [
        2,
        11,
        20,
    ]  # no pretraining: from the start
    assert k_at(dict(pretrain=0.6), 0.7) == gs.K  # no schedule


def test_recall_last_ends_the_prompt_with_the_last_history_item():
    rng = np.random.default_rng(0)
    data = _data(rng)
    user, cands, _ = data["train"][0]
    assert gs.last_item(data, user) == user[-2] - ITEM0  # user rows are [item, newline] * 3
    ids = gs.prompt_ids(data, user, cands[:3], None, tail_item=gs.query_item(data, user, recall_last=True))
    assert ids[-4:] == data["query"] + [user[-2]]
    assert (
        gs.prompt_ids(data, user, cands[:3], None, tail_item=gs.query_item(data, user, False))[-3:]
        == data["query"]
    )


def test_prompt_features_read_position_category_share_cosine_next_part_and_transition():
    from types import SimpleNamespace

    import scipy.sparse as sp

    from rcllm_sdk.prompt import ItemInfo

    catalog = {
        1: ItemInfo(1, "Kalo Saga Part 1", "Space"),
        2: ItemInfo(2, "Kalo Saga Part 2", "Space"),
        3: ItemInfo(3, "Kalo Saga Part 3", "Space"),
        4: ItemInfo(4, "Mira Tale Part 2", "Cooking"),
        5: ItemInfo(5, "Vosh Guide Part 1", "Cooking"),
    }
    embeddings = np.array([[1, 0], [1, 0], [0, 2], [3, 4], [0, 1]], dtype=float)
    retriever = SimpleNamespace(embeddings=embeddings, index={i: i - 1 for i in catalog})
    moves = np.zeros((5, 5))
    moves[1] = [0.2, 0, 0.6, 0.15, 0.05]  # from item 2: to 3 most, then 1, then 4
    transitions = SimpleNamespace(transitions=sp.csr_matrix(moves), index=retriever.index)
    hist, cands = [5, 1, 5, 2], [3, 4, 1]  # last item: Kalo Saga Part 2 (Space)
    f = gs._prompt_features(hist, cands, catalog, retriever)
    assert f.shape == (3, gs.K + len(gs.CONTENT_FEATURES))
    assert (f[:, :3] == np.eye(3)).all() and not f[:, 3 : gs.K].any()  # the position one-hot
    # habits: one open sequel (1 -> 2), not taken: (0 + 1) / (1 + 2); no step stayed: (0 + 1) / (3 + 2)
    np.testing.assert_allclose(
        f[:, gs.K :],
        [
            [1, 0.5, 0.0, 1, 0, 1 / 3, 0.2],  # Part 3 follows Part 2; orthogonal
            [0, 0.5, 0.6, 0, 0, 0, 0],  # Cooking: 2 of 4; cosine 3/5
            [1, 0.5, 1.0, 0, 0, 0, 0.2],
        ],
    )  # Part 1 precedes it; same vector
    moved = gs._prompt_features(hist, cands, catalog, retriever, transitions)[:, gs.K + 4]
    np.testing.assert_allclose(moved, [1.0, 0.25, 0.2 / 0.6])  # over the largest share among the candidates


def test_next_item_logp_is_the_same_left_padded_or_alone():
    torch.manual_seed(0)
    model = gs._fit_item_lm([[1, 2, 3, 4, 5, 6]] * 4, vocab=8, steps=2, window=6, batch=2, seed=0)
    long, short = [1, 2, 3, 4], [5, 6]
    batched = gs._next_item_logp(model, [long, short], [[5, 6], [1, 2]])
    alone = gs._next_item_logp(model, [short], [[1, 2]])
    np.testing.assert_allclose(batched[1], alone[0], atol=1e-5)
    with torch.no_grad():
        direct = model(input_ids=torch.tensor([long])).logits[0, -1].log_softmax(-1)
    np.testing.assert_allclose(batched[0], direct[[5, 6]].numpy(), atol=1e-5)


def test_item_lm_headroom_runs_on_an_ingested_repo(ingested_repo):
    result = gs.item_lm_headroom(ingested_repo, steps=3, window=6, batch=4, scored_history=2)
    assert 0.0 <= result["ndcg10"] <= 1.0 and 0.0 <= result["retriever_ndcg10"] <= 1.0
    assert result["diff_ci"][0] <= result["diff"] <= result["diff_ci"][1]


def test_item_lm_headroom_refuses_scoring_beyond_the_training_window(ingested_repo):
    with pytest.raises(ValueError, match="training window"):
        gs.item_lm_headroom(ingested_repo, steps=1, window=4, scored_history=5)


def test_content_item_lm_marks_category_stays_and_next_parts_of_the_previous_item():
    import polars as pl

    items = pl.DataFrame(
        {
            "title": ["Vo Saga Part 1", "Vo Saga Part 2", "Ka Tale Part 1", "Vo Saga Part 3"],
            "category": ["Mystery", "Mystery", "Mystery", "Health"],
        }
    )
    features = gs._content_features(items, [[0, 1, 2], [3]])
    assert features["part"].tolist() == [1, 2, 1, 3] and features["log_count"].shape == (4, 1)
    assert torch.equal(features["series"][0], features["series"][1])  # the same series name: the same code
    assert not torch.equal(features["series"][0], features["series"][2])
    # 1 + 2 * same category + next part: 0 -> 1 both, 1 -> 2 stays only, 2 -> 3 neither, 1 -> 3 next part only
    codes = gs.ContentItemLM._transition_codes(torch.tensor([0, 1, 2, 3]), features)
    assert codes.tolist() == [4, 3, 1]
    assert gs.ContentItemLM._transition_codes(torch.tensor([1, 3]), features).tolist() == [2]
    assert gs.ContentItemLM._transition_codes(
        torch.tensor([0, 1, 2, 3]), features, sequels=False
    ).tolist() == [3, 3, 1]
    model = gs.ContentItemLM(layers=1, hidden=8, transitions="both")
    scores = model.candidate_scores([[0, 1], [2]], [[2, 3], [0, 1]], features)
    assert scores.shape == (2, 2) and torch.isfinite(scores).all()
