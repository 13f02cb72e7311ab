"""Prompt templates from YAML: keys, named errors, label tokens, BOS / chat template, the cache key,
and serving a YAML template end to end (tiny random checkpoints, in-memory features)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from rcllm_sdk import RcRecommender
from rcllm_sdk.errors import LabelTokenError, TemplateError
from rcllm_sdk.model.tokenizer import label_token_ids
from rcllm_sdk.prompt import ItemInfo, PromptEncoder, PromptTemplate
from rcllm_sdk.prompt.check import check_block_tokenisation
from rcllm_sdk.prompt.template_file import load_template, template_from_mapping

from .tiny_checkpoints import make_checkpoint, make_tokenizer

TWO_FIELDS = """\
item_fields:
  - {name: title, max_words: 4}
  - {name: category, max_words: 2, format: "({value})"}
history_length: 4
instruction: "Rank the candidate films for this user."
label_format: "({label}) "
labels: uppercase
bos: false
chat_template: false
"""
ITEMS = {
    i: {
        "title": f"Film {i} Part {i % 3 + 1} Extended Cut",
        "category": ["Drama", "Comedy|Action", "Science Fiction|Space Opera|War"][i % 3],
        "text": f"the story of {i} told in many words",
    }
    for i in range(1, 31)
}
USERS = {u: [(u * 7 + j * 3) % 30 + 1 for j in range(6)] for u in range(1, 9)}


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen2-bpe"), "qwen2", "bpe")


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("llama-sp"), "llama", "sentencepiece", pad_token=False)


def _yaml(tmp_path, text: str, name: str = "template.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _serve(model, template, **config):
    return RcRecommender.from_frames(USERS, ITEMS, model=model, template=template, candidates=5, **config)


def test_yaml_keys_map_onto_the_template(tmp_path):
    t = load_template(_yaml(tmp_path, TWO_FIELDS))
    assert t.max_history == 4 and t.system == "Rank the candidate films for this user.\n"
    assert t.labels[:3] == ["A", "B", "C"] and len(t.labels) == 26 and not t.item_tokens
    assert [f["name"] for f in t.item_fields] == ["title", "category"]
    item = ItemInfo(3, "Film 3 Part 1 Extended Cut", "Science Fiction|Space Opera", "ignored")
    assert t.label_line("A") == "(A)"
    assert (
        t.candidate_text(item.item_id, item.title, item.category, item.text)
        == " Film 3 Part 1 | (Science Fiction)\n"
    )


def test_a_yaml_template_with_two_fields_and_paren_labels_serves_and_caches(tmp_path, bpe_model):
    path = _yaml(tmp_path, TWO_FIELDS)
    with _serve(bpe_model, path, mode="rcllm", guard=False) as rec:
        first, again = rec.recommend(1, k=3), rec.recommend(1, k=3)
        prompt = rec._prompts([USERS[1]])[0]
        text = rec.ranker.tokenizer.decode(prompt.input_ids)
    assert "\n(A) Film" in text and "(B) Film" in text and text.startswith("Rank the candidate films")
    assert first.cache.misses > 0 and again.cache.misses == 0 and again.cache.hits >= 6
    assert again.item_ids == first.item_ids
    with _serve(bpe_model, path, mode="rcllm", policy="full", guard=False) as exact:
        with exact.with_config(mode="full") as full:
            a, b = exact.recommend(2, k=5), full.recommend(2, k=5)
    assert a.item_ids == b.item_ids
    assert max(abs(x - y) for x, y in zip(a.scores, b.scores, strict=True)) < 1e-4


def test_changing_a_field_changes_the_block_keys(tmp_path):
    tok = make_tokenizer("bpe")
    item = ItemInfo(5, "Film 5 Part 3 Extended Cut", "Drama", "a story")
    base = load_template(_yaml(tmp_path, TWO_FIELDS))
    shorter = load_template(_yaml(tmp_path, TWO_FIELDS.replace("max_words: 4", "max_words: 3"), "b.yaml"))
    other_text = load_template(_yaml(tmp_path, TWO_FIELDS.replace("Rank the", "Order the"), "c.yaml"))

    def item_block(template):
        return PromptEncoder(template, tok).cacheable_blocks([], [item], "model-fp")[-1]

    a, b, c = item_block(base), item_block(shorter), item_block(other_text)
    assert a.token_ids != b.token_ids and a.content_hash != b.content_hash
    assert a.token_ids == c.token_ids and a.content_hash != c.content_hash  # same ids, other template
    assert item_block(load_template(_yaml(tmp_path, TWO_FIELDS, "d.yaml"))).content_hash == a.content_hash


@pytest.mark.parametrize(
    "text, match",
    [
        ("history_lenght: 5\n", "unknown template key"),
        ("history_length: 0\n", "max_history"),
        ("history_length: five\n", "history_length must be an integer"),
        ("label_format: 'A) '\n", r"\{label\}"),
        ("label_format: '({label})'\n", "must end with a space"),
        ("labels: greek\n", "labels 'greek'"),
        ("labels: [A, A]\n", "distinct"),
        ("item_fields: [{name: plot, max_words: 3}]\n", "item field name 'plot'"),
        ("item_fields: [{name: title, max_words: -1}]\n", "max_words"),
        ("item_fields: [{name: title, words: 3}]\n", "keys among"),
        ("bos: maybe\n", "bos must be true or false"),
        ("- a list\n", "mapping"),
    ],
)
def test_bad_templates_raise_template_error(tmp_path, text, match):
    with pytest.raises(TemplateError, match=match):
        load_template(_yaml(tmp_path, text))


def test_missing_template_file_is_a_template_error(tmp_path):
    with pytest.raises(TemplateError, match="could not be read"):
        load_template(tmp_path / "absent.yaml")


def test_the_saved_json_template_of_older_models_still_loads():
    old = PromptTemplate().to_dict()
    for key in ("label_format", "bos", "chat_template", "item_fields", "field_separator"):
        old.pop(key)
    assert PromptTemplate(**old) == PromptTemplate()


@pytest.mark.parametrize("fmt", ["{label}\n", "({label}) ", "{label}. ", "{label}) "])
def test_scored_token_is_the_label_token_of_the_label_block(fmt):
    tok = make_tokenizer("bpe")
    template = PromptTemplate(item_tokens=False, label_format=fmt)
    ids = label_token_ids(tok, template.labels[:20], fmt)
    assert len(set(ids)) == 20
    for label, scored in zip(template.labels[:20], ids, strict=True):
        assert scored in tok([template.label_line(label)], add_special_tokens=False)["input_ids"][0]
        assert tok.decode([scored]).strip() == label


def test_multi_token_or_shared_labels_raise_label_token_error(tmp_path, bpe_model):
    tok = make_tokenizer("bpe")
    with pytest.raises(LabelTokenError, match="one token"):
        label_token_ids(tok, ["Zebracrossing"], "({label}) ")
    with pytest.raises(LabelTokenError, match="share a token id"):
        label_token_ids(tok, ["A", "A"])
    path = _yaml(
        tmp_path, TWO_FIELDS.replace("labels: uppercase", "labels: [Alpha1x, Beta2y, Gamma3z, D, E]")
    )
    with pytest.raises(LabelTokenError):
        _serve(bpe_model, path, mode="full")


def test_bos_opens_the_system_block_once(tmp_path, sp_model):
    from rcllm_sdk.model.ranker import load_ranker

    tok = load_ranker(sp_model).tokenizer
    bos = load_template(_yaml(tmp_path, "bos: true\nlabel_format: '{label}: '\n"))
    blocks = PromptEncoder(bos, tok).cacheable_blocks([], [], "fp")
    assert blocks[0].token_ids[0] == tok.bos_token_id and blocks[0].token_ids.count(tok.bos_token_id) == 1
    chat = load_template(
        _yaml(tmp_path, "bos: true\nchat_template: true\nlabel_format: '{label}: '\n", "c.yaml")
    )
    encoder = PromptEncoder(chat, tok)  # the [INST] template writes the BOS itself: not doubled
    ids = encoder.parts([ItemInfo(1, "T", "C")], [ItemInfo(2, "U", "D")])
    flat = [t for _, block in ids for t in block]
    assert flat.count(tok.bos_token_id) == 1 and flat[0] == tok.bos_token_id
    assert encoder.query_text.endswith(" [/INST]")
    with _serve(
        sp_model, _yaml(tmp_path, "bos: true\nlabel_format: '{label}: '\n", "d.yaml"), mode="full"
    ) as rec:
        prompt = rec._prompts([USERS[3]])[0]
        assert prompt.input_ids[0] == tok.bos_token_id
        with rec.with_config(mode="rcllm", policy="full", guard=False, store="memory://") as exact:
            a, b = exact.recommend(3, k=5), rec.recommend(3, k=5)
    assert max(abs(x - y) for x, y in zip(a.scores, b.scores, strict=True)) < 1e-4


def test_chat_template_prefix_in_system_block_suffix_in_query_block():
    tok = make_tokenizer("bpe")
    encoder = PromptEncoder(PromptTemplate(item_tokens=False, chat_template=True), tok)
    texts = encoder.texts([ItemInfo(1, "T", "C")], [ItemInfo(2, "U", "D")])
    assert texts[0][1].startswith("<|im_start|>user\n") and texts[-1][1].endswith("<|im_start|>assistant\n")
    assert check_block_tokenisation(encoder).identical
    with pytest.raises(TemplateError, match="no chat template"):
        PromptEncoder(PromptTemplate(chat_template=True), lambda texts, add_special_tokens=False: {})


def test_load_time_check_warns_for_sentencepiece_only(tmp_path, bpe_model, sp_model, caplog):
    template = _yaml(tmp_path, "label_format: '{label}: '\n")
    with caplog.at_level(logging.WARNING, logger="rcllm_sdk.prompt"):
        _serve(bpe_model, template, mode="full").close()
        assert not [r for r in caplog.records if "tokenise prompt blocks" in r.message]
        _serve(sp_model, template, mode="full").close()
        _serve(sp_model, template, mode="full").close()  # said once per model and template
    warnings = [r.getMessage() for r in caplog.records if "tokenise prompt blocks" in r.getMessage()]
    assert len(warnings) == 1
    assert "identical tokens" in warnings[0] and "first difference" in warnings[0]


def test_sentencepiece_blocks_differ_from_whole_text_but_modes_agree(tmp_path, sp_model):
    template = _yaml(tmp_path, "label_format: '{label}: '\nhistory_length: 3\n")
    with _serve(sp_model, template, mode="full") as full:
        check = check_block_tokenisation(full.encoder)
        assert not check.identical and check.block_tokens != check.whole_tokens
        with full.with_config(mode="prefix", store="memory://") as prefix:
            with full.with_config(mode="rcllm", policy="full", guard=False, store="memory://") as exact:
                runs = [m.recommend_batch([1, 2, 3], k=5) for m in (full, prefix, exact)]
    for a, b in ((runs[0], runs[1]), (runs[0], runs[2])):
        diff = max(
            abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra.scores, rb.scores, strict=True)
        )
        assert diff < 1e-4


def test_template_from_mapping_names_its_source():
    with pytest.raises(TemplateError, match="my.yaml: unknown"):
        template_from_mapping({"instructions": "x"}, "my.yaml")


def test_train_config_takes_a_template_for_the_verbalizer_not_item_lm(tmp_path):
    from rcllm_sdk.cli import _train_config, build_parser
    from rcllm_sdk.pipelines.train_config import TrainConfig

    path = str(_yaml(tmp_path, TWO_FIELDS))
    assert TrainConfig.resolve(recipe="verbalizer", template=path).record()["template"] == path
    with pytest.raises(TemplateError, match="item-lm recipe builds its own"):
        TrainConfig.resolve(template=path)
    with pytest.raises(TemplateError, match="unknown template key"):
        TrainConfig.resolve(recipe="verbalizer", template=str(_yaml(tmp_path, "x: 1\n", "bad.yaml")))
    args = build_parser().parse_args(["train", "--recipe", "verbalizer", "--template", path])
    assert _train_config(args).template == path


def test_a_verbalizer_trained_with_a_yaml_template_saves_and_serves_it(tmp_path):
    from rcllm_sdk.model.ranker import load_ranker
    from rcllm_sdk.pipelines.train import TrainConfig, train_ranker
    from rcllm_sdk.retrieval import Retriever

    path = str(_yaml(tmp_path, TWO_FIELDS))
    catalog = {i: ItemInfo(i, row["title"], row["category"], row["text"]) for i, row in ITEMS.items()}
    sequences = [[(start + step) % 30 + 1 for step in range(8)] for start in range(30)]
    retriever = Retriever.fit(sequences, list(catalog), np.zeros((30, 2)))
    config = TrainConfig(
        recipe="verbalizer", size="micro", steps=2, batch_size=2, vocab_size=400, candidates=5, template=path
    )
    _, summary = train_ranker(
        [(sequences, retriever)], catalog, {}, tmp_path / "ranker", config, progress=False
    )
    assert summary["template"] == path
    assert load_ranker(tmp_path / "ranker").template == load_template(path)
    with RcRecommender.from_frames(USERS, ITEMS, model=tmp_path / "ranker", candidates=5, mode="full") as rec:
        assert rec.encoder.texts([], [ItemInfo(1, "T", "C")])[2][1] == "(A)"


def test_refresh_and_serving_share_one_cache_key_per_template(tmp_path, bpe_model):
    """``rcllm refresh``'s blocks (``cacheable_blocks``) are the ones a request reads: the first
    request after a refresh misses only its user block."""
    from rcllm_sdk.prompt.encoder import cacheable_blocks
    from rcllm_sdk.runtime.refresh import refresh_blocks

    with _serve(bpe_model, _yaml(tmp_path, TWO_FIELDS), mode="rcllm", guard=False) as rec:
        catalog = [ItemInfo(i, **row) for i, row in ITEMS.items()]
        ranker = rec.ranker
        blocks = cacheable_blocks([], catalog, ranker.template, ranker.tokenizer, ranker.fingerprint)
        refresh_blocks(rec.engine, blocks, progress=False)
        first = rec.recommend(4, k=3)
    assert (first.cache.hits, first.cache.misses) == (1 + 5, 1)
