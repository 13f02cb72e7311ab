"""Ranker save/load round trip, fingerprints, load errors and full-prefill scoring vs the HF forward."""

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rcllm_sdk.errors import ModelLoadError
from rcllm_sdk.model.ranker import PRESETS, build_ranker, fingerprint, load_ranker, save_ranker
from rcllm_sdk.model.scoring import score_full
from rcllm_sdk.model.tokenizer import label_token_ids, train_tokenizer
from rcllm_sdk.prompt import PromptTemplate


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    template = PromptTemplate(max_history=3)
    tok = train_tokenizer(["alpha beta gamma", "delta epsilon"] * 10, [1, 2, 3], template, vocab_size=300)
    ranker = build_ranker(tok, template, PRESETS["micro"], {1: [1.0, 0.0], 2: [0.0, 1.0], 3: [0.6, 0.8]})
    path = save_ranker(ranker, tmp_path_factory.mktemp("model") / "ranker")
    return ranker, path


def test_save_load_gives_identical_scores(saved):
    ranker, path = saved
    loaded = load_ranker(path)
    assert loaded.template == ranker.template and loaded.fingerprint == ranker.fingerprint
    ids = ranker.tokenizer("alpha <i1> beta <i2> A", add_special_tokens=False)["input_ids"]
    labels = label_token_ids(ranker.tokenizer, ["A", "B", "C"])
    a = score_full(ranker.model, [ids], [labels], 0)[0]
    b = score_full(loaded.model, [ids], [labels], 0)[0]
    assert torch.equal(a, b)


def test_batched_padded_scores_equal_the_plain_hf_forward(saved):
    ranker, _ = saved
    tok = ranker.tokenizer
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("alpha beta <i3> gamma", "delta")]
    labels = label_token_ids(tok, ["A", "B"])
    batched = score_full(ranker.model, prompts, [labels, labels], tok.pad_token_id)
    for ids, got in zip(prompts, batched, strict=False):
        with torch.no_grad():
            ref = ranker.model(torch.tensor([ids])).logits[0, -1, labels]
        assert torch.allclose(got, ref, atol=1e-5)


def test_fingerprint_changes_with_weights_and_config(saved, tmp_path):
    ranker, path = saved
    copy = tmp_path / "copy"
    save_ranker(ranker, copy)
    assert fingerprint(copy) == fingerprint(path)
    with torch.no_grad():
        ranker.model.lm_head.weight[0, 0] += 1.0
    save_ranker(ranker, copy)
    assert fingerprint(copy) != fingerprint(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5 if cfg.get("rms_norm_eps") != 1e-5 else 1e-6
    (copy / "config.json").write_text(json.dumps(cfg))
    assert fingerprint(copy) != fingerprint(path)


def test_item_embeddings_start_from_cooccurrence_vectors(saved):
    ranker, _ = saved
    emb = ranker.model.get_input_embeddings().weight
    ids = ranker.tokenizer.convert_tokens_to_ids(["<i1>", "<i2>", "<i3>"])
    cos = torch.nn.functional.cosine_similarity(emb[ids[0]], emb[ids[2]], dim=0)
    far = torch.nn.functional.cosine_similarity(emb[ids[0]], emb[ids[1]], dim=0)
    assert cos > far  # vectors (1,0) and (0.6,0.8) are closer than (1,0) and (0,1)


def test_load_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_ranker(tmp_path / "absent")
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(gpt2)
    with pytest.raises(ModelLoadError, match="not supported"):
        load_ranker(gpt2)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError):
        load_ranker(tmp_path / "broken")


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_other_rotary_families_load_and_score(saved, tmp_path, family):
    from transformers import AutoConfig, AutoModelForCausalLM

    ranker, _ = saved
    tok = ranker.tokenizer
    config = AutoConfig.for_model(
        family,
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        **({"sliding_window": None} if family == "mistral" else {}),  # an active window is refused
    )
    folder = tmp_path / family
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    loaded = load_ranker(folder)
    assert loaded.template.item_tokens is False  # a foreign checkpoint has no rcllm template
    ids = tok("alpha beta A", add_special_tokens=False)["input_ids"]
    labels = label_token_ids(tok, ["A", "B"])
    with torch.no_grad():
        ref = loaded.model(torch.tensor([ids])).logits[0, -1, labels]
    assert torch.allclose(score_full(loaded.model, [ids], [labels], tok.pad_token_id)[0], ref, atol=1e-5)
