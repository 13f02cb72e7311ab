"""Renderer: exact spans and hashes on a hand-made prompt; blocks concatenate to the full tokenisation."""

import pytest

from rcllm_sdk.errors import ConfigError
from rcllm_sdk.model.tokenizer import label_token_ids, train_tokenizer
from rcllm_sdk.prompt import ItemInfo, PromptTemplate, block_hash, full_text, render

HISTORY = [ItemInfo(1, "Solar Saga Part 1", "Space"), ItemInfo(2, "Solar Saga Part 2", "Space")]
CANDIDATES = [
    ItemInfo(3, "Solar Saga Part 3", "Space", "a long voyage home"),
    ItemInfo(7, "(500) Days: Redux", "Romance|Comedy", "  leading spaces and 'quotes'"),
]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [i.title + " " + i.category for i in HISTORY + CANDIDATES] * 5
    return train_tokenizer(texts, [1, 2, 3, 7], PromptTemplate(), vocab_size=300)


def test_block_layout_and_spans(tokenizer):
    prompt = render(HISTORY, CANDIDATES, PromptTemplate(), tokenizer, "fp")
    assert [b.kind for b in prompt.blocks] == ["system", "user", "label", "item", "label", "item", "query"]
    starts = [b.start for b in prompt.blocks]
    ends = [b.end for b in prompt.blocks]
    assert starts[0] == 0 and starts[1:] == ends[:-1]  # contiguous, non-overlapping spans
    assert prompt.labels == ("A", "B") and prompt.candidate_ids == (3, 7)
    item_block = prompt.blocks[3]
    assert tokenizer.convert_ids_to_tokens(item_block.token_ids[0]) == "<i3>"
    assert tokenizer.decode(prompt.blocks[2].token_ids) == "A\n"


@pytest.mark.parametrize(
    "template",
    [
        PromptTemplate(),
        PromptTemplate(item_tokens=False, item_text_words=4),
        PromptTemplate(titles=False, max_history=1),
    ],
)
def test_blocks_concatenate_to_full_prompt_tokenisation(tokenizer, template):
    prompt = render(HISTORY, CANDIDATES, template, tokenizer, "fp")
    whole = tokenizer(full_text(HISTORY, CANDIDATES, template), add_special_tokens=False)["input_ids"]
    assert prompt.input_ids == whole


def test_item_text_words_limits_the_description():
    line = PromptTemplate(item_text_words=2, item_tokens=False).item_line(
        3, "T", "A|B", "one two three", with_text=True
    )
    assert line == "T (A, B): one two\n"


def test_hash_depends_on_fingerprint_kind_and_tokens():
    base = block_hash("m1", "item", [1, 2, 3])
    assert base == block_hash("m1", "item", [1, 2, 3])
    assert (
        len(
            {
                base,
                block_hash("m2", "item", [1, 2, 3]),
                block_hash("m1", "user", [1, 2, 3]),
                block_hash("m1", "item", [1, 2, 4]),
            }
        )
        == 4
    )
    assert 0 <= base < 2**64


def test_same_item_block_has_same_hash_in_any_position(tokenizer):
    a = render(HISTORY, CANDIDATES, PromptTemplate(), tokenizer, "fp")
    b = render(HISTORY, CANDIDATES[::-1], PromptTemplate(), tokenizer, "fp")
    assert a.blocks[3].content_hash == b.blocks[5].content_hash
    assert a.blocks[3].start != b.blocks[5].start


def test_labels_are_single_tokens(tokenizer):
    ids = label_token_ids(tokenizer, PromptTemplate().labels)
    assert len(set(ids)) == len(ids) == 52
    with pytest.raises(ConfigError, match="one token"):
        label_token_ids(tokenizer, ["Zebra crossing"])


def test_too_many_candidates_for_labels(tokenizer):
    with pytest.raises(ConfigError, match="labels"):
        render(HISTORY, CANDIDATES, PromptTemplate(labels=["A"]), tokenizer, "fp")


def test_training_block_encoder_equals_the_renderer(tokenizer):
    from rcllm_sdk.pipelines.examples import BlockEncoder, Example, encode

    catalog = {i.item_id: i for i in HISTORY + CANDIDATES}
    template = PromptTemplate(item_text_words=3, max_history=1)
    example = Example((1, 2), (7, 3), 1)
    ids, (start, end) = BlockEncoder(catalog, template, tokenizer).encode(example)
    assert ids == encode(example, catalog, template, tokenizer)
    prompt = render(HISTORY, CANDIDATES[::-1], template, tokenizer, "fp")
    assert (start, end) == (prompt.blocks[1].start, prompt.blocks[1].end)


def test_one_encoder_serves_every_prompt_and_tokenises_a_text_once(tokenizer):
    """A held encoder (the recommender's, the trainers') gives render's blocks, its cached item
    lines give the same ids a fresh tokenisation gives, and it counts each distinct text once."""
    from rcllm_sdk.prompt import PromptEncoder

    calls = []

    def counting(texts, add_special_tokens=False):
        calls.extend(texts)
        return tokenizer(texts, add_special_tokens=add_special_tokens)

    encoder = PromptEncoder(PromptTemplate(item_text_words=3), counting)
    for _ in range(3):
        prompt = encoder.render(HISTORY, CANDIDATES, "fp")
    assert prompt == render(HISTORY, CANDIDATES, PromptTemplate(item_text_words=3), tokenizer, "fp")
    item_line = PromptTemplate(item_text_words=3).item_line(
        3, "Solar Saga Part 3", "Space", "a long voyage home", True
    )
    assert calls.count(item_line) == 1 and calls.count(PromptTemplate().system) == 1
    assert calls.count(PromptTemplate().user_text(HISTORY)) == 3  # every history is its own
