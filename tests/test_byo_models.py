"""Bring your own checkpoint: tiny random Llama / Qwen2 / Qwen3 / Mistral folders with byte-level BPE
and SentencePiece-style tokenizers (one without a pad token), RoPE scalings, PEFT adapters and
refused configurations, served through ``RcRecommender.from_feature_store``.

Every served case checks that ``full``, ``prefix`` and ``rcllm`` score the same token sequence (the
concatenation of the prompt's blocks) and that ``rcllm`` with ``policy="full"`` and ``prefix`` equal
the plain Hugging Face forward (``mode="full"``) within 1e-4 in float32.
"""

from __future__ import annotations

import json

import pytest
import torch

from rcllm_sdk import RcRecommender
from rcllm_sdk.errors import (
    ConfigError,
    DeviceUnavailableError,
    ModelLoadError,
    UnsupportedDtypeError,
    UnsupportedModelError,
)
from rcllm_sdk.model.device import resolve_dtype
from rcllm_sdk.model.ranker import fingerprint, load_ranker
from rcllm_sdk.runtime.engine import BlockEngine
from rcllm_sdk.runtime.model_view import ModelView, RopeTable, apply_rope
from tests.tiny_checkpoints import default_texts, make_checkpoint

USERS = [1, 2, 3, 5]
CANDIDATES = 8
TOLERANCE = 1e-4

# (family, tokenizer, pad token): each family with both tokenizers, two of them without a pad token.
FAMILY_CASES = [
    ("llama", "sentencepiece", False),
    ("llama", "bpe", True),
    ("qwen2", "bpe", True),
    ("qwen2", "sentencepiece", True),
    ("qwen3", "bpe", False),
    ("qwen3", "sentencepiece", True),
    ("mistral", "sentencepiece", True),
    ("mistral", "bpe", True),
]
ROPE_CASES = {
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "yarn": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256},
    "linear": {"rope_type": "linear", "factor": 2.0},
}


@pytest.fixture(scope="module")
def texts(tiny_world):
    _, items = tiny_world
    return default_texts(items)


@pytest.fixture
def seen(monkeypatch) -> dict[str, list]:
    """Token ids each mode hands to the model, recorded at the scoring calls: ``full`` (the HF
    forward), ``prefix`` and ``rcllm`` (the block engine, which also checks the blocks tile them)."""
    import rcllm_sdk.recommender as recommender

    record: dict[str, list] = {}

    def wrap(name, fn, ids_of):
        def recorded(*args, **kwargs):
            record.setdefault(name, []).extend(ids_of(*args))
            return fn(*args, **kwargs)

        return recorded

    def prompt_ids(_engine, prompts, *_):
        for p in prompts:
            assert [b.start for b in p.blocks] == [0] + [b.end for b in p.blocks[:-1]]  # blocks tile it
        return [p.input_ids for p in prompts]

    monkeypatch.setattr(recommender, "score_full", wrap("full", recommender.score_full, lambda m, s, *_: s))
    monkeypatch.setattr(BlockEngine, "score", wrap("rcllm", BlockEngine.score, prompt_ids))
    monkeypatch.setattr(BlockEngine, "score_prefix", wrap("prefix", BlockEngine.score_prefix, prompt_ids))
    return record


def serve_all_modes(repo, model, seen) -> dict[str, list]:
    """Recommendations for USERS in every mode, all candidates ranked."""
    settings = dict(candidates=CANDIDATES, store="memory://", guard=False, policy="full")
    with RcRecommender.from_feature_store(repo, model=model, **settings) as rec:
        served = {"rcllm:full": rec.recommend_batch(USERS, k=CANDIDATES)}
        for name, overrides in {
            "full": dict(mode="full"),
            "prefix": dict(mode="prefix"),
            "rcllm": dict(policy="block_head:2"),
        }.items():
            with rec.with_config(**overrides) as other:
                served[name] = other.recommend_batch(USERS, k=CANDIDATES)
    served["seen"] = dict(seen)
    return served


def scores_by_item(recommendations) -> list[dict[int, float]]:
    return [dict(zip(r.item_ids, r.scores, strict=True)) for r in recommendations]


def max_difference(a, b) -> float:
    diffs = [abs(x[i] - y[i]) for x, y in zip(scores_by_item(a), scores_by_item(b), strict=True) for i in x]
    return max(diffs)


def assert_modes_agree(served) -> None:
    seen = served["seen"]
    full_ids = seen["full"]
    assert len(full_ids) == len(USERS) and seen["prefix"] == full_ids
    assert seen["rcllm"] == full_ids * 2  # policy full, then block_head:2: one token sequence everywhere
    assert [r.prompt_tokens for r in served["rcllm"]] == [len(ids) for ids in full_ids]
    for mode in ("rcllm:full", "prefix", "rcllm"):
        assert [r.candidates for r in served[mode]] == [r.candidates for r in served["full"]]
    assert all(r.mode == "rcllm" for r in served["rcllm:full"])
    assert max_difference(served["rcllm:full"], served["full"]) < TOLERANCE
    assert max_difference(served["prefix"], served["full"]) < TOLERANCE
    spread = max(max(s) - min(s) for s in (r.scores for r in served["full"]))
    assert spread > 100 * TOLERANCE  # the scores differ between candidates: the comparison means something


@pytest.mark.parametrize(("family", "tokenizer", "pad"), FAMILY_CASES)
def test_each_family_and_tokenizer_serves_every_mode_like_the_hf_forward(
    ingested_repo, tmp_path, texts, seen, family, tokenizer, pad
):
    folder = make_checkpoint(tmp_path / "model", family, tokenizer, pad_token=pad, texts=texts)
    served = serve_all_modes(ingested_repo, folder, seen)
    assert_modes_agree(served)


@pytest.mark.parametrize("rope", list(ROPE_CASES))
def test_rope_scalings_reposition_cached_keys_exactly(ingested_repo, tmp_path, texts, seen, rope):
    folder = make_checkpoint(tmp_path / "model", "llama", "bpe", rope_scaling=ROPE_CASES[rope], texts=texts)
    assert load_ranker(folder).model.config.rope_parameters["rope_type"] == rope
    assert_modes_agree(serve_all_modes(ingested_repo, folder, seen))


@pytest.mark.parametrize("rope", ["default", *ROPE_CASES])
def test_shifting_a_cached_key_equals_rotating_it_at_its_new_position(tmp_path, texts, rope):
    """What ``rcllm`` does to a reused block: a key the model rotated at position p (yarn's
    attention factor included), moved by d with the engine's rotation table, is the key the
    model rotates at p + d."""
    folder = make_checkpoint(
        tmp_path / "model", "llama", "bpe", rope_scaling=ROPE_CASES.get(rope), texts=texts
    )
    view = ModelView.of(load_ranker(folder).model)
    keys = torch.randn(40, view.n_kv_heads, view.head_dim, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(40) * 3
    delta = torch.arange(40) * 37 + 5  # shifts up to ~1500 positions, past yarn's original 256
    cached = apply_rope(keys, *view.rope(positions, keys))
    moved = RopeTable(view.base.rotary_emb.inv_freq).rotate(cached, delta)
    want = apply_rope(keys, *view.rope(positions + delta, keys))
    assert (moved - want).abs().max() < 1e-4


def make_adapter(base, out, seed: int = 1):
    """A LoRA adapter over ``base`` with random (not zero) B matrices, saved as peft writes it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    peft_model.save_pretrained(out)
    return peft_model.merge_and_unload()


def test_peft_adapter_serves_as_its_merged_model(ingested_repo, tmp_path, texts, seen):
    base = make_checkpoint(tmp_path / "base", "qwen2", "bpe", texts=texts)
    merged = make_adapter(base, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)

    ranker = load_ranker(tmp_path / "adapter")
    ids = torch.tensor([list(range(5, 40))])
    with torch.no_grad():
        plain = load_ranker(base).model(ids).logits
        want, got = merged(ids).logits, ranker.model(ids).logits
    assert (got - plain).abs().max() > 1e-3  # the adapter changes the model
    assert (got - want).abs().max() < 1e-5  # and equals peft's merge
    assert ranker.fingerprint not in (fingerprint(base), fingerprint(tmp_path / "adapter"))
    assert_modes_agree(serve_all_modes(ingested_repo, tmp_path / "adapter", seen))


def test_adapter_fingerprint_covers_its_base(tmp_path, texts):
    base = make_checkpoint(tmp_path / "base", "llama", "bpe", texts=texts)
    make_adapter(base, tmp_path / "adapter")
    before = load_ranker(tmp_path / "adapter").fingerprint
    make_checkpoint(tmp_path / "base", "llama", "bpe", texts=texts, seed=7)  # new base weights, same path
    assert load_ranker(tmp_path / "adapter").fingerprint != before


def test_adapter_without_a_local_base_is_refused(tmp_path, texts):
    base = make_checkpoint(tmp_path / "base", "llama", "bpe", texts=texts)
    make_adapter(base, tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}))
    with pytest.raises(ModelLoadError, match="nothing is downloaded from a hub"):
        load_ranker(tmp_path / "adapter")


REFUSED = {
    "dynamic rope": (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_type 'dynamic'"),
    "longrope": (
        dict(
            rope_scaling={
                "rope_type": "longrope",
                "short_factor": [1.0] * 8,
                "long_factor": [2.0] * 8,
                "original_max_position_embeddings": 256,
            }
        ),
        "rope_type 'longrope'",
    ),
    "mistral window": (dict(family="mistral", sliding_window=128), "sliding-window"),
    "qwen2 window": (
        dict(family="qwen2", use_sliding_window=True, sliding_window=128, max_window_layers=1),
        "sliding-window",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_configurations_are_named(tmp_path, texts, case):
    kwargs, message = REFUSED[case]
    folder = make_checkpoint(tmp_path / "model", **{"family": "llama", **kwargs}, texts=texts)
    with pytest.raises(UnsupportedModelError, match=message) as info:
        load_ranker(folder)
    assert "supported:" in str(info.value)


@pytest.mark.parametrize(
    ("family", "settings"),
    [
        ("qwen2", dict(use_sliding_window=False, sliding_window=128)),  # the field set, the switch off
        ("qwen2", dict(use_sliding_window=True, sliding_window=128, max_window_layers=2)),  # no layer uses it
        ("mistral", dict(sliding_window=2048)),  # as long as the positions the model accepts
    ],
)
def test_sliding_window_fields_that_never_take_effect_are_served(tmp_path, texts, family, settings):
    folder = make_checkpoint(tmp_path / "model", family, texts=texts, **settings)
    assert load_ranker(folder).model.config.model_type == family


def test_remote_code_and_other_heads_are_refused(tmp_path, texts):
    folder = make_checkpoint(tmp_path / "model", "llama", texts=texts)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Model"}}))
    with pytest.raises(UnsupportedModelError, match="trust_remote_code"):
        load_ranker(folder)
    head = {**config, "architectures": ["LlamaForSequenceClassification"]}
    (folder / "config.json").write_text(json.dumps(head))
    with pytest.raises(UnsupportedModelError, match="not a causal LM"):
        load_ranker(folder)


def test_cuda_without_cuda_is_a_named_error(ingested_repo, tmp_path, texts, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine, or any, without CUDA
    folder = make_checkpoint(tmp_path / "model", "qwen2", texts=texts)
    with pytest.raises(DeviceUnavailableError, match="CUDA is not available"):
        RcRecommender.from_feature_store(ingested_repo, model=folder, device="cuda")


def test_mlflow_registry_alias_loads_a_folder_or_an_adapter_and_names_its_version(tmp_path, texts):
    import mlflow
    from mlflow import MlflowClient

    base = make_checkpoint(tmp_path / "base", "qwen2", "bpe", texts=texts)
    make_adapter(base, tmp_path / "adapter")
    client, name = MlflowClient(), "byo-ranker"
    client.create_registered_model(name)
    for folder in (base, tmp_path / "adapter"):
        with mlflow.start_run() as run:
            mlflow.log_artifacts(str(folder), artifact_path="model")
        client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(name, "champion", "1")

    champion = load_ranker(f"models:/{name}@champion")
    assert champion.version == "1" and champion.fingerprint == fingerprint(base)
    adapter = load_ranker(f"models:/{name}/2")
    assert adapter.version == "2" and adapter.fingerprint == load_ranker(tmp_path / "adapter").fingerprint
    assert load_ranker(f"runs:/{run.info.run_id}/model").version == ""
    with pytest.raises(ModelLoadError, match="no model version"):
        load_ranker(f"models:/{name}@absent")


def test_dtype_and_device_settings(ingested_repo, tmp_path, texts):
    folder = make_checkpoint(tmp_path / "model", "llama", "sentencepiece", pad_token=False, texts=texts)
    with RcRecommender.from_feature_store(
        ingested_repo, model=folder, dtype="bfloat16", store="memory://", guard=False, candidates=CANDIDATES
    ) as rec:
        assert rec.ranker.model.dtype == torch.bfloat16
        assert len(rec.recommend(USERS[0], k=3).item_ids) == 3
        with pytest.raises(ConfigError, match="load it again"):
            rec.with_config(dtype="float32")  # the loaded model is shared: another dtype is another load
    with pytest.raises(ConfigError, match="device"):
        RcRecommender.from_feature_store(ingested_repo, model=folder, device="tpu")
    cuda = torch.device("cuda")
    assert (
        resolve_dtype("auto", cuda) == torch.bfloat16
        and resolve_dtype("auto", torch.device("cpu")) == torch.float32
    )
    assert resolve_dtype("auto", cuda, recipe="item-lm") == torch.float32
    with pytest.raises(UnsupportedDtypeError, match="float32"):
        resolve_dtype("bfloat16", cuda, recipe="item-lm")
