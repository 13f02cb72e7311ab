"""The block runner against the plain HF forward: full recompute, prefix reuse, true-context
assembly, the RoPE shift, policies and faulty cache values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from rcllm_sdk.cache.base import LOCAL, MISS, Read
from rcllm_sdk.errors import ConfigError
from rcllm_sdk.model.ranker import Ranker
from rcllm_sdk.model.scoring import score_full
from rcllm_sdk.prompt.renderer import Block, RenderedPrompt, block_hash
from rcllm_sdk.runtime import blockkv
from rcllm_sdk.runtime.engine import BlockEngine
from rcllm_sdk.runtime.guard import CostModel, fit, prompt_shape
from rcllm_sdk.runtime.model_view import ModelView, apply_rope, shift_keys
from rcllm_sdk.runtime.policies import fresh_ranges, parse_policy
from rcllm_sdk.runtime.runner import _most_deviating

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
}
LABELS = [10, 11, 12, 13, 14]


class DictStore:
    """A minimal store double whose values the tests can corrupt."""

    def __init__(self):
        self.values: dict[int, torch.Tensor] = {}

    def batched_get(self, keys, placement=None):
        return [self.values.get(k) for k in keys]

    def batched_read(self, keys, placement=None):
        return [Read(v, LOCAL) if v is not None else Read(None, MISS) for v in self.batched_get(keys)]

    def batched_put(self, items, placement=None):
        self.values.update(items)
        return []

    def batched_contains(self, keys):
        return [k in self.values for k in keys]


def tiny_model(family: str, seed: int = 0):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        **extra,
    )
    return model_cls(config).eval()


def make_prompt(rng, fingerprint: str = "fp", items: int = 5) -> RenderedPrompt:
    shape = [("system", 6), ("user", 15)]
    for _ in range(items):
        shape += [("label", 2), ("item", int(rng.integers(4, 12)))]
    shape.append(("query", 5))
    blocks, start = [], 0
    for kind, n in shape:
        ids = (5, 6, 7, 8, 9, 10) if kind == "system" else tuple(int(t) for t in rng.integers(20, 250, n))
        blocks.append(Block(kind, ids, start, block_hash(fingerprint, kind, ids)))
        start += n
    return RenderedPrompt(tuple(blocks), tuple(range(items)), tuple("ABCDE"[:items]))


def engine_for(model, policy="full", store=None, **options) -> BlockEngine:
    """The runner under test: the guard off (it would send short prompts to the HF forward)."""
    options.setdefault("guard", False)
    return BlockEngine(
        Ranker(model, None, None, "fp"), store or DictStore(), policy, backend="torch", **options
    )


def max_diff(scored, reference) -> float:
    return max(float((s.logits - r).abs().max()) for s, r in zip(scored, reference, strict=False))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_policy_and_prefix_equal_the_hf_forward(family):
    model, rng = tiny_model(family), np.random.default_rng(1)
    prompts = [make_prompt(rng) for _ in range(3)]
    reference = score_full(model, [p.input_ids for p in prompts], [LABELS] * 3, 0)
    engine = engine_for(model)
    assert max_diff(engine.score(prompts, [LABELS] * 3), reference) <= 1e-4
    cold = engine.score_prefix(prompts, [LABELS] * 3)
    engine.flush()  # write-back is asynchronous
    warm = engine.score_prefix(prompts, [LABELS] * 3)
    assert max_diff(cold, reference) <= 1e-4 and max_diff(warm, reference) <= 1e-4
    assert cold[0].cache.hits == 0 and warm[0].cache.hits > 0 and warm[0].cache.recomputed_fraction < 0.5


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_blocks_from_their_true_context_assemble_to_the_hf_cache(family):
    """Store each block's KV as the HF forward computed it in the real prompt (moved back to
    its canonical position): assembly must rebuild the HF cache and ``none`` its logits."""
    model, prompt = tiny_model(family), make_prompt(np.random.default_rng(2))
    ids = torch.tensor([prompt.input_ids])
    out = model(input_ids=ids, use_cache=True)
    hf = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in out.cache.layers], dim=1)
    hf = hf.permute(0, 1, 3, 2, 4)  # [2, L, T, kv_heads, head_dim]
    engine, system_len = engine_for(model), len(prompt.blocks[0].token_ids)
    found = {}
    for block in prompt.blocks:
        if block.kind in ("label", "query"):
            continue
        kv = hf[:, :, block.start : block.end].clone()
        back = torch.full(
            (len(block.token_ids),), float(system_len - block.start if block.kind != "system" else 0)
        )
        kv[0] = shift_keys(kv[0], back, engine.inv_freq)
        found[block.content_hash] = kv
    assembled, _ = engine.assemble([prompt], found)
    cached = torch.tensor([b.kind not in ("label", "query") for b in prompt.blocks for _ in b.token_ids])
    assert torch.allclose(assembled[:, :, cached], hf[:, :, cached], atol=1e-5)
    engine.store.batched_put([(h, blockkv.pack(kv, h)) for h, kv in found.items()])
    reference = score_full(model, [prompt.input_ids], [LABELS], 0)
    assert max_diff(engine.score([prompt], [LABELS], parse_policy("none")), reference) <= 1e-4


def _rope64(x, positions, inv_freq):
    angles = positions.double()[:, None] * inv_freq.double()[None, :]
    emb = torch.cat((angles, angles), -1)[:, None, :]
    return apply_rope(x, emb.cos(), emb.sin())


def test_rope_shift_is_exact():
    view = ModelView.of(tiny_model("llama"))
    inv_freq = view.base.rotary_emb.inv_freq
    start, delta = torch.arange(40) * 97, torch.randint(-500, 9000, (40,))
    keys = torch.randn(40, 2, 16, dtype=torch.float64)
    shifted = shift_keys(_rope64(keys, start, inv_freq), delta, inv_freq)
    assert torch.allclose(shifted, _rope64(keys, start + delta, inv_freq), atol=1e-10)
    # fp32, as served: the shift adds no more error than the model's own rotation at the target
    near = torch.randint(0, 200, (40,))
    cos, sin = view.rope(start[:40] % 50, keys.float())
    cos2, sin2 = view.rope(start % 50 + near, keys.float())
    moved = shift_keys(apply_rope(keys.float(), cos, sin), near, inv_freq)
    assert torch.allclose(moved, apply_rope(keys.float(), cos2, sin2), atol=1e-5)


def test_policies_select_what_they_claim():
    kinds, lengths = ["system", "user", "label", "item", "label", "item", "query"], [3, 6, 1, 5, 1, 2, 2]

    def as_list(spec):
        return [
            t for start, end in parse_policy(spec).selected_ranges(kinds, lengths) for t in range(start, end)
        ]

    fresh = [9, 15, 18, 19]
    assert [t for start, end in fresh_ranges(kinds, lengths) for t in range(start, end)] == fresh
    assert as_list("none") == fresh
    assert as_list("block_head:2") == sorted(fresh + [3, 4, 10, 11, 16, 17])
    assert as_list("block_head:0") == fresh
    assert as_list("full") == list(range(20)) and as_list("deviation:0.2:1") == list(range(20))
    assert (
        parse_policy("deviation:0.15").check_layer == 1
        and parse_policy("block_head:8").spec == "block_head:8"
    )
    for bad in ("blockhead:3", "block_head", "deviation:2", "none:1", "block_head:-1"):
        with pytest.raises(ConfigError):
            parse_policy(bad)


def test_deviation_keeps_pinned_rows_and_the_most_deviating_share_per_request():
    deviation = torch.tensor([5.0, 1.0, 9.0, 0.0, 3.0, 8.0, 7.0, 2.0, 0.5, 6.0])
    pinned = torch.tensor([0, 0, 0, 1, 0, 1, 0, 0, 0, 0], dtype=torch.bool)
    kept = _most_deviating(deviation, pinned, torch.tensor([0, 6, 10]), ratio=0.5)
    # request 0: pinned row 3, free rows 0,1,2,4 -> top 2 by deviation = 2, 0; request 1: rows 6..9 -> 6, 9
    assert kept.tolist() == [0, 2, 3, 5, 6, 9]


def test_deviation_policy_recomputes_the_stated_fraction():
    model, prompt = tiny_model("llama"), make_prompt(np.random.default_rng(3))
    engine = engine_for(model)
    scored = engine.score([prompt], [LABELS], parse_policy("deviation:0.25:1"))
    fresh = sum(len(b.token_ids) for b in prompt.blocks if b.kind in ("label", "query"))
    expected = fresh + round(0.25 * (prompt.text_length - fresh))
    assert scored[0].cache.recomputed_fraction == pytest.approx(expected / prompt.text_length)


def _corruptions(stored: torch.Tensor, other_hash: int) -> dict[str, torch.Tensor]:
    """Bad versions of one stored block value (``[2, L, T+1, W]``)."""
    two, layers, rows, width = stored.shape
    same_shape_other_block = blockkv.pack(
        stored[:, :, :-1].reshape(two, layers, rows - 1, 2, width // 2), other_hash
    )
    return {
        "truncated": stored[:, :, :-2].clone(),
        "wrong shape": stored[:, :1].clone(),
        "wrong dtype": stored.to(torch.float16),
        "another block": same_shape_other_block,
    }


@pytest.mark.parametrize("case", ["truncated", "wrong shape", "wrong dtype", "another block"])
def test_a_bad_stored_block_is_recomputed_and_counted(case, caplog):
    model, rng = tiny_model("llama"), np.random.default_rng(4)
    prompt = make_prompt(rng)
    store = DictStore()
    engine = engine_for(model, "block_head:2", store, hot_block_bytes=0)  # every score reads the store
    clean = engine.score([prompt], [LABELS])[0]
    engine.flush()
    item = next(b for b in prompt.blocks if b.kind == "item")
    store.values[item.content_hash] = _corruptions(store.values[item.content_hash], 12345)[case]
    again = engine.score([prompt], [LABELS])[0]
    engine.flush()
    assert again.cache.misses == 1 and again.cache.hits == clean.cache.misses - 1
    assert torch.allclose(again.logits, clean.logits, atol=1e-6)
    assert "does not match" in caplog.text
    assert (
        blockkv.unpack(
            store.values[item.content_hash], item.content_hash, len(item.token_ids), 3, 2, 16, torch.float32
        )
        is not None
    )  # rewritten correctly


@pytest.mark.parametrize("start", [0, 7, 40])
def test_the_causal_suffix_path_equals_the_scattered_path(start):
    """Prefix caching's suffix takes the fused-SDPA path; it must agree with the general one."""
    from rcllm_sdk.kernels.attention import _scattered, attend_one

    torch.manual_seed(start)
    q, k, v = torch.randn(60 - start, 4, 16), torch.randn(60, 2, 16), torch.randn(60, 2, 16)
    q_pos, k_pos = torch.arange(start, 60), torch.arange(60)
    fast = attend_one(q, k, v, q_pos, k_pos, 0.25)
    general = _scattered(q, k, v, q_pos, k_pos, 0.25, torch.float32)
    assert torch.allclose(fast, general, atol=1e-5)


# ---- the reuse guard ---------------------------------------------------------------------------
NEVER_PAYS = CostModel(0.0, 0.0, 1e9, 0.0, 0.0)
ALWAYS_PAYS = CostModel(1e9, 0.0, 0.0, 0.0, 0.0)


def test_the_guard_runs_full_prefill_exactly_where_reuse_cannot_pay():
    model, rng = tiny_model("llama"), np.random.default_rng(5)
    short, long = make_prompt(rng, items=2), make_prompt(rng, items=5)
    reference = score_full(model, [short.input_ids], [LABELS[:2]], 0)[0]
    guarded = engine_for(model, "block_head:2", guard=NEVER_PAYS).score([short], [LABELS[:2]])[0]
    assert torch.equal(guarded.logits, reference)  # the same forward as full mode: bit-identical
    assert guarded.cache.fallback_full and guarded.cache.hits + guarded.cache.misses == 0
    # a per-prompt decision: reuse pays for prompts with more than 60 tokens under this model
    by_length = CostModel(0.0, 1.0, 60.0, 0.0, 0.0)
    engine = engine_for(model, "none", guard=by_length)
    out = engine.score([short, long], [LABELS[:2], LABELS])
    assert short.text_length < 60 < long.text_length
    assert torch.equal(out[0].logits, reference) and out[0].cache.fallback_full
    assert not out[1].cache.fallback_full and out[1].cache.misses > 0
    reused = engine_for(model, "none", guard=False).score([long], [LABELS])[0]
    assert torch.equal(out[1].logits, reused.logits)


def test_prompt_shape_and_the_fitted_cost_model():
    kinds, lengths = ["system", "user", "label", "item", "label", "item", "query"], [6, 15, 2, 8, 2, 3, 5]
    shape = prompt_shape(kinds, lengths, parse_policy("block_head:2"), layers=4)
    assert (shape.tokens, shape.recomputed, shape.blocks) == (41, 2 + 2 + 2 + 2 + 2 + 5, 4)
    dev = prompt_shape(kinds, lengths, parse_policy("deviation:0.5:1"), layers=4)
    assert dev.recomputed == round((2 * 41 + 2 * (9 + 0.5 * 32)) / 4)
    truth = CostModel(2.0, 0.05, 3.0, 0.1, 0.05)  # a recomputed token costs what a prompt token does
    full = [(t, truth.full_ms(t)) for t in (50, 200, 800)]
    reuse = [(r, b, truth.reuse_ms(r, b)) for r, b in ((20, 10), (60, 40), (150, 30), (40, 90))]
    fitted = fit(full, reuse)
    for name, value in truth.to_dict().items():
        assert getattr(fitted, name) == pytest.approx(value, rel=1e-6, abs=1e-9)
    assert fitted.reuse_pays(800, 60, 40) and not fitted.reuse_pays(50, 40, 10)


def test_the_engine_calibrates_its_cost_model_once_on_first_score():
    model, rng = tiny_model("llama"), np.random.default_rng(6)
    engine = engine_for(model, "block_head:2", guard=True)
    assert engine.cost_model is None
    engine.score([make_prompt(rng)], [LABELS])
    fitted = engine.cost_model
    assert fitted is not None and all(v >= 0 for v in fitted.to_dict().values())
    engine.score([make_prompt(rng)], [LABELS])
    assert engine.cost_model is fitted
    # another engine of the same model, backend and policy reuses the fit; another policy measures
    assert engine_for(model, "block_head:2", guard=True).calibrate_guard() is fitted
    assert engine_for(model, "none", guard=True).calibrate_guard() is not fitted


# ---- the hot-block cache -----------------------------------------------------------------------
def test_hot_blocks_serve_the_same_kv_and_never_a_rewritten_blocks_old_value():
    from rcllm_sdk.runtime.refresh import refresh_blocks

    model, rng = tiny_model("llama"), np.random.default_rng(7)
    prompt = make_prompt(rng)
    store = DictStore()
    engine = engine_for(model, "none", store)
    engine.score([prompt], [LABELS])
    engine.flush()
    cold = engine_for(model, "none", store, hot_block_bytes=0).score([prompt], [LABELS])[0]
    hot = engine.score([prompt], [LABELS])[0]
    assert len(engine.hot) == len(prompt.blocks) - 6 and torch.equal(hot.logits, cold.logits)
    # a forced refresh rewrites an item block under its key (here with another model's KV)
    other = engine_for(tiny_model("llama", seed=9), "none", store)
    item = next(b for b in prompt.blocks if b.kind == "item")
    system = prompt.blocks[0]
    system_kv = other.compute([system], None)[system.content_hash]
    store.values[item.content_hash] = blockkv.pack(
        other.compute([item], system_kv)[item.content_hash], item.content_hash
    )
    engine.hot.discard([item.content_hash])  # what refresh_blocks(engine, force=True) does
    changed = engine.score([prompt], [LABELS])[0]
    assert not torch.equal(changed.logits, hot.logits)  # the new value is served
    refresh_blocks(engine, [system, item], force=True, progress=False)  # rewrites the original value
    refreshed = engine.score([prompt], [LABELS])[0].logits
    # recomputed in a batch of another shape: equal up to float rounding on some CPUs, not bitwise
    assert torch.allclose(refreshed, hot.logits, rtol=0, atol=1e-5)
    assert (refreshed - changed.logits).abs().max() > 100 * (refreshed - hot.logits).abs().max()


def test_hot_blocks_stay_within_their_bound():
    from rcllm_sdk.runtime.hot_blocks import HotBlocks

    hot = HotBlocks(max_bytes=3 * 4 * 10)
    for key in range(5):
        hot.put_many({key: torch.zeros(10)})  # 40 bytes each
    assert len(hot) == 3 and hot.bytes == 120 and set(hot.get_many(list(range(5)))) == {2, 3, 4}
    hot.get_many([2])  # 2 becomes the most recent
    hot.put_many({9: torch.zeros(10)})
    assert set(hot.get_many(list(range(10)))) == {2, 4, 9}
