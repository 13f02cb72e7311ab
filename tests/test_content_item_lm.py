"""Content item LMs (``--item-features content``): relation markers, content embeddings, and the
materialised Llama the item-lm recipe compiles (pipelines/item_lm/content.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rcllm_sdk.errors import ConfigError
from rcllm_sdk.model.tokenizer import train_tokenizer
from rcllm_sdk.pipelines.item_lm import UserBlockWindows, item_lm_config, item_lm_template
from rcllm_sdk.pipelines.item_lm.content import (
    Catalog,
    ContentItemLM,
    ContentWindows,
    _earlier_items,
    content_features,
)
from rcllm_sdk.pipelines.run import catalog_from_repo
from rcllm_sdk.pipelines.train import TrainConfig, tokenizer_corpus
from rcllm_sdk.prompt import ItemInfo, item_token, render
from rcllm_sdk.prompt.renderer import full_text
from rcllm_sdk.prompt.template import (
    SAME_CATEGORY_MARKER,
    SEQUEL_MARKER,
    PromptTemplate,
    relation,
    series_part,
)


def test_series_and_part_are_read_off_titles():
    assert series_part("Gibu Part 3") == ("Gibu", 3)
    assert series_part("Toy Story 2 (1999)") == ("Toy Story", 2)
    assert series_part("Rocky IV (1985)") == ("Rocky", 4)
    assert series_part("Alien: 3") == ("Alien", 3)
    assert series_part("Heat (1995)") == ("Heat", 1)
    assert series_part("Apollo 13 (1995)") == ("Apollo 13", 1)  # bare numbers above 9 are part of the title


def test_relation_markers_open_each_history_line_but_the_first():
    assert relation("Gibu Part 1", "Drama", "Gibu Part 2", "Drama") == SEQUEL_MARKER
    assert relation("Gibu Part 1", "Drama", "Gibu Part 3", "Drama") == SAME_CATEGORY_MARKER
    assert relation("Toy Story (1995)", "Animation", "Toy Story 2 (1999)", "Animation") == SEQUEL_MARKER
    assert relation("Gibu Part 1", "Drama", "Moka Part 1", "Crime") == ""
    history = [
        ItemInfo(1, "Gibu Part 1", "Drama"),
        ItemInfo(2, "Gibu Part 2", "Drama"),
        ItemInfo(3, "Moka Part 1", "Drama"),
        ItemInfo(4, "Tavo Part 1", "Crime"),
    ]
    template = item_lm_template(relation_markers=True)
    assert (
        template.user_text(history)
        == f"History:\n<i1>\n{SEQUEL_MARKER}<i2>\n{SAME_CATEGORY_MARKER}<i3>\n<i4>\n<next>\n"
    )
    assert template.user_text(history[1:]).startswith("History:\n<i2>\n")  # the block's first line: no marker
    assert "<sequel>" not in PromptTemplate().user_text(history)  # off by default


@pytest.fixture(scope="module")
def content_setup(ingested_repo):
    catalog = catalog_from_repo(ingested_repo)
    template = item_lm_template(max_history=10, relation_markers=True)
    tok = train_tokenizer(tokenizer_corpus(catalog, template), catalog.keys(), template, 600)
    rows = {item: n for n, item in enumerate(catalog)}
    items = list(catalog.values())
    rng = np.random.default_rng(0)
    sequences = [list(rng.choice(len(items), size=12, replace=False)) for _ in range(40)]
    sequences[0][1] = sequences[0][0]  # never mind repeats: only the rows matter here
    return dict(
        catalog=catalog,
        template=template,
        tok=tok,
        rows=rows,
        target=Catalog.from_sequences(items, sequences),
        windows=ContentWindows(template, tok),
    )


def test_relation_markers_keep_the_blocks_equal_to_the_whole_prompts_tokens(content_setup):
    catalog, tok, template = content_setup["catalog"], content_setup["tok"], content_setup["template"]
    items = list(catalog.values())
    history, candidates = items[:9], items[20:26]
    assert any(m in template.user_text(history) for m in (SEQUEL_MARKER, SAME_CATEGORY_MARKER))
    prompt = render(history, candidates, template, tok, "fp")
    assert (
        prompt.input_ids
        == tok(full_text(history, candidates, template), add_special_tokens=False)["input_ids"]
    )


def test_content_windows_are_the_rendered_user_block_with_items_left_to_content(content_setup):
    catalog, tok, template = content_setup["catalog"], content_setup["tok"], content_setup["template"]
    items = list(catalog.values())
    window = [0, 3, 4, 5, 9, 2]
    encoded = content_setup["windows"].encode(content_setup["target"], window[:-1], window[-1])
    item_tokens = UserBlockWindows(catalog, template, tok).item_token_ids
    as_tokens = [int(item_tokens[-t - 1]) if t < 0 else t for t in encoded]
    rendered = tok(
        template.system + template.user_text([items[r] for r in window[:-1]]), add_special_tokens=False
    )
    assert as_tokens == rendered["input_ids"][:-1] + [
        tok.convert_tokens_to_ids(item_token(items[window[-1]].item_id))
    ]


def test_an_item_is_predicted_before_its_own_relation_marker(content_setup):
    """Swapping the second line's marker changes nothing about how its item is predicted (the
    prediction is read before the line starts); the item after it may use the marker."""
    target, windows, tok = content_setup["target"], content_setup["windows"], content_setup["tok"]
    torch.manual_seed(0)
    model = ContentItemLM(item_lm_config(tok, "micro", tie=False)).eval()
    window = windows.encode(target, [0, 5], 7)
    markers = windows.relation_ids.tolist()
    at = next(n for n, t in enumerate(window) if t == -6) - 1  # the token before item row 5
    variants = []
    for marker in markers:
        changed = list(window)
        if window[at] in markers:
            changed[at] = marker
        else:
            changed.insert(at + 1, marker)
        with torch.no_grad():
            variants.append(model.next_item_logits(target, [changed], tok.pad_token_id, windows.relation_ids))
    (first, targets), (second, _) = variants
    assert targets.tolist() == [0, 5, 7]
    assert torch.allclose(first[:2], second[:2], atol=1e-5)  # the marker's own item and the one before
    assert not torch.allclose(first[2], second[2])  # the next item reads the marker


def test_earlier_items_masks_what_came_before_each_target_in_its_window():
    seen = _earlier_items(torch.tensor([0, 0, 0, 1, 1]), torch.tensor([5, 6, 7, 2, 3]), logits_width=8)
    want = torch.zeros(5, 8, dtype=torch.bool)
    want[1, 5] = want[2, 5] = want[2, 6] = want[4, 2] = True
    assert torch.equal(seen, want)


def test_content_embeddings_belong_to_content_not_to_items():
    items = [
        ItemInfo(1, "Gibu Part 2", "Drama"),
        ItemInfo(2, "Gibu Part 2", "Drama"),
        ItemInfo(3, "Moka Part 2", "Drama"),
        ItemInfo(4, "Gibu Part 2", "Drama|Crime"),
    ]
    features = content_features(items, np.array([5, 5, 5, 5]))
    assert features.part.tolist() == [2, 2, 2, 2]
    assert (features.categories[3] != features.categories[0]).any()
    model = ContentItemLM(
        item_lm_config(
            train_tokenizer(["x"], [1, 2, 3, 4], item_lm_template(relation_markers=True), 300),
            "micro",
            tie=False,
        )
    )
    for side in model.content(features):
        assert torch.equal(side[0], side[1])  # same content: same embedding, whatever the item id
        assert not torch.allclose(side[0], side[2]) and not torch.allclose(side[0], side[3])


def test_the_materialized_llama_predicts_like_the_content_model(content_setup):
    """After training, item tokens' rows hold the content embeddings: a plain forward over the
    rendered tokens gives the content model's next-item logits."""
    tok, target, windows = content_setup["tok"], content_setup["target"], content_setup["windows"]
    torch.manual_seed(0)
    model = ContentItemLM(item_lm_config(tok, "micro", tie=False)).eval()
    encoded = windows.encode(target, [1, 2, 3, 7], 8)[:-1]  # up to the marker
    inputs, outputs = model.content(target.features)
    ids = torch.tensor([encoded])
    embeds = torch.where(
        (ids < 0)[..., None],
        inputs[(-ids - 1).clamp(min=0)],
        model.llama.model.embed_tokens(ids.clamp(min=0)),
    )
    with torch.no_grad():
        want = model.llama.model(inputs_embeds=embeds).last_hidden_state[0, -1] @ outputs.T
        item_tokens = UserBlockWindows(
            content_setup["catalog"], content_setup["template"], tok
        ).item_token_ids
        llama = model.materialize(target, item_tokens)
        as_tokens = torch.tensor([[int(item_tokens[-t - 1]) if t < 0 else t for t in encoded]])
        got = llama(input_ids=as_tokens).logits[0, -1, item_tokens]
    assert torch.allclose(got, want, atol=1e-4)


def test_content_item_lm_recipe_end_to_end(ingested_repo, tmp_path):
    from rcllm_sdk import RcRecommender
    from rcllm_sdk.pipelines.run import train_from_repo

    config = TrainConfig.resolve(
        recipe="item-lm",
        size="micro",
        steps=20,
        batch_size=8,
        vocab_size=600,
        max_examples=300,
        item_features="content",
        pretrain_worlds=1,
    )
    summary = train_from_repo(ingested_repo, tmp_path / "ranker", config, progress=False, log_mlflow=False)[
        "summary"
    ]
    assert summary["item_features"] == "content" and summary["compiled_top1_agreement"] >= 0.95
    full = RcRecommender.from_feature_store(ingested_repo, model=tmp_path / "ranker", mode="full")
    cached = RcRecommender.from_feature_store(ingested_repo, model=tmp_path / "ranker", mode="rcllm")
    assert full.ranker.template.relation_markers
    for user in (1, 2, 3):
        assert full.recommend(user, k=5).item_ids == cached.recommend(user, k=5).item_ids


def test_relation_markers_and_content_features_go_together(ingested_repo, tmp_path):
    from rcllm_sdk.pipelines.item_lm import train_item_lm_ranker

    config = TrainConfig.resolve(
        recipe="item-lm", item_features="id", size="micro", steps=1, batch_size=2, vocab_size=600
    )
    with pytest.raises(ConfigError, match="relation markers"):
        train_item_lm_ranker(
            [],
            catalog_from_repo(ingested_repo),
            tmp_path,
            config,
            template=item_lm_template(relation_markers=True),
            progress=False,
        )


@pytest.mark.parametrize(
    "option",
    [
        dict(recipe="verbalizer", item_features="content"),
        dict(recipe="item-lm", item_features="id", pretrain_worlds=2),
        dict(recipe="item-lm", item_features="words"),
        dict(recipe="item-lm", item_features="content", pretrain_worlds=-1),
    ],
)
def test_train_config_rejects_content_options_where_they_cannot_apply(option):
    with pytest.raises(ConfigError):
        TrainConfig.resolve(**{"size": "micro", **option})
