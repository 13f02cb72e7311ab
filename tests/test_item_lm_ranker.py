"""The item-LM recipe: a trained item LM with the label lookup compiled around it (pipelines/item_lm/)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from rcllm_sdk.cache.memory import MemoryStore
from rcllm_sdk.errors import ConfigError
from rcllm_sdk.ingest import read_manifest
from rcllm_sdk.model.ranker import Ranker
from rcllm_sdk.model.scoring import score_full
from rcllm_sdk.model.tokenizer import label_token_ids, train_tokenizer
from rcllm_sdk.pipelines.examples import BlockEncoder, build_examples
from rcllm_sdk.pipelines.item_lm import (
    UserBlockWindows,
    candidate_scores,
    compile_ranker,
    item_lm_template,
    score_basis,
    train_item_lm,
    validation_split,
)
from rcllm_sdk.pipelines.item_lm.fitting import _EarlyStopping, _ItemLoss
from rcllm_sdk.pipelines.run import catalog_from_repo, cross_fitted_groups
from rcllm_sdk.pipelines.train import TrainConfig, tokenizer_corpus
from rcllm_sdk.prompt import item_token, render
from rcllm_sdk.prompt.template import NEXT_MARKER, PromptTemplate
from rcllm_sdk.runtime.engine import BlockEngine

K = 8


@pytest.fixture(scope="module")
def compiled(ingested_repo):
    """A briefly trained item LM on the tiny world, a readout with a strong score weight (so the
    lookup, not the position prior, decides) and the compiled model."""
    torch.manual_seed(0)
    catalog = catalog_from_repo(ingested_repo)
    template = item_lm_template(max_history=10)
    tok = train_tokenizer(tokenizer_corpus(catalog, template), catalog.keys(), template, 600)
    windows = UserBlockWindows(catalog, template, tok)
    groups = cross_fitted_groups(ingested_repo, read_manifest(ingested_repo))
    base, _, _ = train_item_lm(
        [s for g, _ in groups for s in g],
        windows,
        TrainConfig(recipe="item-lm", size="micro", steps=40, batch_size=8, candidates=K),
        progress=False,
    )
    examples, _ = build_examples(groups, K, max_examples=400, seed=0)
    prompts = [BlockEncoder(catalog, template, tok).encode(e)[0] for e in examples]
    candidates = [[tok.convert_tokens_to_ids(item_token(i)) for i in e.candidates] for e in examples]
    basis = score_basis(base, windows.item_token_ids, 32)
    scores = candidate_scores(base, prompts, candidates, windows.marker_id, basis)
    tau, bias = 3.0 / float(scores.std()), np.linspace(0.5, -0.5, K)
    model = compile_ranker(base, tok, template, tau, bias, basis, windows.item_token_ids, prompts[:64])
    expected = tau * scores + torch.tensor(bias, dtype=torch.float32)
    return dict(
        base=base,
        model=model,
        tok=tok,
        template=template,
        catalog=catalog,
        examples=examples,
        prompts=prompts,
        expected=expected,
        windows=windows,
    )


def _label_scores(model, tok, prompts):
    labels = label_token_ids(tok, list("ABCDEFGH"))
    return torch.stack(score_full(model, prompts, [labels] * len(prompts), tok.pad_token_id))


def test_the_compiled_lookup_ranks_candidates_like_the_readout(compiled):
    held_out = slice(64, 264)  # not used for calibration
    got = _label_scores(compiled["model"], compiled["tok"], compiled["prompts"][held_out])
    want = compiled["expected"][held_out]
    assert bool((got.argmax(1) == want.argmax(1)).all())
    # The label logits are proportional to a softmax of the readout (at a per-prompt temperature),
    # so the whole order agrees except where the readout nearly ties.
    same_order = (got.argsort(1, descending=True) == want.argsort(1, descending=True)).all(1).float()
    assert same_order.mean() >= 0.9


def test_the_compiled_model_computes_the_item_lms_states_up_to_the_marker(compiled):
    """The item LM's layers run unchanged inside the wider model (extra dimensions are small and
    RMSNorm weights rescaled): its residual stream entering the lookup equals the item LM's own."""
    base, model = compiled["base"], compiled["model"]
    prompt = compiled["prompts"][0]
    ids = torch.tensor([prompt[: prompt.index(compiled["windows"].marker_id) + 1]])
    seen = {}
    hooks = [
        base.model.norm.register_forward_pre_hook(lambda _, x: seen.__setitem__("base", x[0])),
        model.model.layers[len(base.model.layers)].input_layernorm.register_forward_pre_hook(
            lambda _, x: seen.__setitem__("compiled", x[0])
        ),
    ]
    with torch.no_grad():
        base(input_ids=ids), model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    want = seen["base"][0]
    got = seen["compiled"][0, :, : want.shape[-1]]
    assert torch.allclose(got, want, atol=1e-3 * float(want.abs().max()))


@pytest.mark.parametrize("text_words", [0, 8])
def test_rcllm_default_policy_ranks_like_full_prefill(compiled, text_words):
    """Item tokens need their label and the marker's prediction: block_head:2 recomputes them. With
    description words the item blocks are long and mostly reused from their canonical context
    (this tokenizer never saw descriptions, so they are spelt in single characters, label letters
    included): those tokens must stay out of the lookup there too."""
    tok, catalog = compiled["tok"], compiled["catalog"]
    template = dataclasses.replace(compiled["template"], item_text_words=text_words)
    ranker = Ranker(compiled["model"], tok, template, "item-lm-test")
    engine = BlockEngine(
        ranker,
        MemoryStore("memory://", f"item-lm-test-{text_words}"),
        "block_head:2",
        backend="torch",
        guard=False,  # reuse always: this test checks the cached path
    )
    examples = compiled["examples"][64:80]
    prompts = [
        render(
            [catalog[i] for i in e.history], [catalog[i] for i in e.candidates], template, tok, "item-lm-test"
        )
        for e in examples
    ]
    labels = [label_token_ids(tok, list(p.labels)) for p in prompts]
    reference = score_full(compiled["model"], [p.input_ids for p in prompts], labels, tok.pad_token_id)
    assert text_words == 0 or min(len(p.blocks[3].token_ids) for p in prompts) > 8
    for _ in range(2):  # cold, then from the store
        scored = engine.score(prompts, labels)
        engine.flush()
        for s, r in zip(scored, reference, strict=False):
            # Same top candidate; the scores carry large constants, so reused (rotated) keys move
            # them by float32 rounding, about 1e-3 relative.
            assert int(s.logits.argmax()) == int(r.argmax())
            assert torch.allclose(s.logits, r, atol=1e-2 * float(r.abs().max()))


def test_train_item_lm_recipe_end_to_end(ingested_repo, tmp_path):
    from rcllm_sdk import RcRecommender
    from rcllm_sdk.errors import ModelLoadError
    from rcllm_sdk.model.ranker import load_ranker
    from rcllm_sdk.pipelines.run import train_from_repo

    config = TrainConfig(
        recipe="item-lm", size="micro", steps=20, batch_size=8, vocab_size=600, max_examples=300
    )
    result = train_from_repo(ingested_repo, tmp_path / "ranker", config, progress=False, log_mlflow=False)
    summary = result["summary"]
    assert summary["recipe"] == "item-lm" and summary["compiled_top1_agreement"] >= 0.95
    assert len(summary["readout_bias"]) == config.candidates
    users = [1, 2, 3]
    full = RcRecommender.from_feature_store(ingested_repo, model=tmp_path / "ranker", mode="full")
    cached = RcRecommender.from_feature_store(ingested_repo, model=tmp_path / "ranker", mode="rcllm")
    for user in users:
        assert full.recommend(user, k=5).item_ids == cached.recommend(user, k=5).item_ids
    with pytest.raises(ModelLoadError, match="float32"):  # its compiled constants break in bf16 (measured)
        load_ranker(tmp_path / "ranker", dtype=torch.bfloat16)


@pytest.mark.parametrize(
    "option",
    [
        dict(block_aware=True),
        dict(history_lm_weight=1.0),
        dict(candidates=40),
        dict(item_lm_rank=500),
        dict(recipe="nonsense"),
    ],
)
def test_train_config_rejects_what_the_item_lm_recipe_cannot_do(option):
    with pytest.raises(ConfigError):
        TrainConfig.resolve(**{"recipe": "item-lm", "size": "small", **option})


def test_compact_lines_and_the_history_footer():
    template = PromptTemplate(titles=False, categories=False, history_footer=f"{NEXT_MARKER}\n")
    assert template.item_line(7, "Title", "Drama") == "<i7>\n"
    assert PromptTemplate(categories=False).item_line(7, "Title", "Drama") == "<i7>Title\n"
    assert PromptTemplate().item_line(7, "Title", "Drama") == "<i7>Title (Drama)\n"

    class Item:
        item_id, title, category = 7, "Title", "Drama"

    assert template.user_text([Item()]).endswith(f"<i7>\n{NEXT_MARKER}\n")
    with pytest.raises(ConfigError):
        PromptTemplate(history_footer=NEXT_MARKER)  # no newline: breaks the block boundary rule
    with pytest.raises(ConfigError):
        PromptTemplate(titles=False, categories=False, item_tokens=False)
    tok = train_tokenizer(["x"], [7], template, 300)
    assert len(tok(NEXT_MARKER, add_special_tokens=False)["input_ids"]) == 1


def test_train_config_takes_the_recipes_measured_defaults_unless_given():
    verbalizer, item_lm = TrainConfig(recipe="verbalizer"), TrainConfig(recipe="item-lm", size="micro")
    assert (verbalizer.batch_size, verbalizer.lr) == (32, 2e-3)
    assert (item_lm.batch_size, item_lm.lr) == (64, 3e-3)
    given = TrainConfig(recipe="item-lm", size="micro", batch_size=8, lr=1e-3)
    assert (given.batch_size, given.lr) == (8, 1e-3)


def test_early_stopping_keeps_the_best_weights_and_stops_after_patience_checks():
    model = torch.nn.Linear(2, 1)
    stopper = _EarlyStopping(patience=2, every=10)
    assert stopper.due(10, 100) and stopper.due(95, 95) and not stopper.due(15, 100)
    stops = []
    for step, loss in ((10, 3.0), (20, 2.0), (30, 2.5), (40, 2.6)):
        with torch.no_grad():
            model.weight.fill_(loss)  # the weights the loss belongs to
        stops.append(stopper.record(model, loss, step))
    assert stops == [False, False, False, True]
    assert stopper.restore(model).weight[0, 0].item() == 2.0
    assert stopper.summary(40)["item_lm_best_step"] == 20


def test_item_lm_returns_the_weights_of_its_best_validation_check(compiled, ingested_repo):
    groups = cross_fitted_groups(ingested_repo, read_manifest(ingested_repo))
    config = TrainConfig.resolve(
        recipe="item-lm", size="micro", steps=60, batch_size=8, lr=3e-2, candidates=K, item_lm_patience=2
    )
    sequences = [s for g, _ in groups for s in g]
    model, _, record = train_item_lm(sequences, compiled["windows"], config, progress=False)
    _, validation = validation_split(sequences, compiled["windows"].encode, config)
    assert validation and record["item_lm_validation_history"]
    assert min(loss for _, loss in record["item_lm_validation_history"]) == record["item_lm_validation_loss"]
    assert _ItemLoss(compiled["windows"]).evaluate(model, validation) == pytest.approx(
        record["item_lm_validation_loss"], abs=1e-3
    )
