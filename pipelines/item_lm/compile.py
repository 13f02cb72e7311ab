"""Compiling the label lookup around a trained item LM (step 3 of the item-lm recipe).

The label lookup is compiled around the trained layers as two more Llama layers with
constructed weights (:func:`compile_ranker`). Extra hidden dimensions (:class:`Layout`) carry it:

- layer L, attention: every token after the marker copies the marker's next-item prediction
  (a rank-R projection: PRED); each candidate's item token copies its label from two tokens
  back (LAB), at a magnitude that dominates its norm, so RMSNorm scales every candidate alike;
  every other token rests on the system block's first token (a sink that cached blocks see too).
- layer L, MLP: SCORE = PRED . KEY, the item LM's logit of the token's own item (KEY, the item's
  rank-R output embedding, is part of its input embedding), exact by silu(z) - silu(-z) = z.
- layer L+1, attention: the last token attends to the candidates' item tokens with score
  ``tau * SCORE + b[label] + gate`` and copies their labels (OUT); ``gate``, carried by LAB, is
  large enough that no other token competes. The label tokens' output rows read OUT.

The result is a plain ``LlamaForCausalLM`` on which every serving mode runs; the label logits
rank candidates by ``tau * logit + b[label]`` (logits proportional to its softmax).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rcllm_sdk.model.scoring import pad_batch, score_full
from rcllm_sdk.model.tokenizer import label_token_ids
from rcllm_sdk.prompt import PromptTemplate
from rcllm_sdk.prompt.template import NEXT_MARKER

from ..positional import positional_weights
from .layout import (
    BIND_MARGIN,
    BIND_OFFSET,
    GATE_MARGIN,
    GATHER_SCORE,
    LABEL_SCALE,
    OUT_SCALE,
    POSITIONAL_SPAN,
    ROBUST,
    SINK,
    SMALL,
    SPAN,
    Layout,
    _rope_theta,
    check_binding,
    check_margins,
)
from .readout import _scores_of, marker_predictions


@torch.no_grad()
def compile_ranker(
    base: LlamaForCausalLM,
    tokenizer,
    template: PromptTemplate,
    tau: float,
    bias: np.ndarray,
    basis: torch.Tensor,
    item_token_ids: torch.Tensor,
    calibration: list[list[int]],
) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` whose label logits at a prompt's last token rank the candidates by
    ``tau * s + bias[label]``, ``s`` the item LM's rank-R logit of the candidate after the user
    block (module docstring). ``calibration`` prompts (rendered with ``template``) set the scales
    of the compiled layers from the item LM's actual hidden-state norms."""
    k, rank = len(bias), basis.shape[1]
    cfg = base.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    gather_heads = math.ceil(rank / head_dim)
    check_margins(cfg, k, head_dim)
    labels = label_token_ids(tokenizer, template.labels[:k])
    marker = tokenizer.convert_tokens_to_ids(NEXT_MARKER)
    heads = max(cfg.num_attention_heads, gather_heads + 1)
    layout = Layout(cfg.hidden_size, k, rank, multiple=heads)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=layout.width,
            intermediate_size=max(cfg.intermediate_size, 2 * rank),
            num_hidden_layers=cfg.num_hidden_layers + 2,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            head_dim=head_dim,
            max_position_embeddings=cfg.max_position_embeddings,
            rope_theta=_rope_theta(cfg),
            rms_norm_eps=cfg.rms_norm_eps * cfg.hidden_size / layout.width,  # same eps per item-LM dim
            pad_token_id=cfg.pad_token_id,
            bos_token_id=cfg.bos_token_id,
            eos_token_id=cfg.eos_token_id,
            tie_word_embeddings=False,
        )
    )
    for p in model.parameters():
        p.zero_()
    sink = calibration[0][0]  # every prompt, and every cached block's context, starts with the system block
    key_scale = _copy_item_lm(base, model, layout, labels, marker, sink, basis, item_token_ids)
    norms = _residual_norms(model, calibration, cfg.num_hidden_layers, marker, labels, item_token_ids)
    _set_gather(model, base, layout, basis, norms, gather_heads, head_dim)
    predictions = marker_predictions(base, calibration, marker) @ basis  # one item-LM pass for both uses
    bound = _set_binding(model, layout, norms, gather_heads, head_dim, float(predictions.norm(dim=1).max()))
    s = _scores_of(predictions, base, [_candidate_tokens(p, labels) for p in calibration], basis)
    score_unit = float(norms["candidate"].max()) / float(s.abs().max())  # SCORE = score_unit * s
    _set_product(model, layout, bound, score_unit, key_scale)
    final = _residual_norms(model, calibration, cfg.num_hidden_layers + 1, marker, labels, item_token_ids)[
        "final"
    ]
    _set_lookup(model, layout, tau, bias, bound, score_unit, float(final.median()), head_dim, labels)
    return model.eval()


def _copy_item_lm(
    base,
    model,
    layout: Layout,
    labels: list[int],
    marker: int,
    sink: int,
    basis: torch.Tensor,
    item_token_ids: torch.Tensor,
) -> float:
    """The item LM's layers, embeddings and head in the first ``hidden`` dimensions, with RMSNorm
    weights rescaled so that its hidden states are unchanged by the (small) extra dimensions;
    embedding extras: CONST everywhere, MARK on the marker, SINK on the system block's first token,
    KEY and ITEM_FLAG on item tokens, large CONST, LABEL_FLAG and one-hot LABEL_SRC on label tokens.
    Returns the scale of KEY (KEY = scale * out_emb @ basis)."""
    h, width = layout.hidden, layout.width
    rescale = math.sqrt(h / width)
    emb, base_emb = model.model.embed_tokens.weight, base.model.embed_tokens.weight
    emb[:, :h] = base_emb
    typical = float(base_emb[item_token_ids].norm(dim=1).median())
    small = SMALL * typical
    emb[:, layout.const] = small
    emb[marker, layout.mark] = small
    emb[sink, layout.sink] = small
    keys = base.lm_head.weight[item_token_ids] @ basis
    key_scale = small / float(keys.norm(dim=1).median())
    emb[item_token_ids, layout.key] = key_scale * keys
    emb[item_token_ids, layout.item_flag] = small
    big = LABEL_SCALE * typical  # label tokens come after the marker: their item-LM state is never read
    emb[labels, :h] = 0
    emb[labels, layout.const] = big  # so that label tokens, too, rest on the sink in the binding head
    emb[labels, layout.label_flag] = big
    for j, token in enumerate(labels):
        emb[token, layout.label_src.start + j] = big
    for src, dst in zip(base.model.layers, model.model.layers, strict=False):
        _copy_layer(src, dst, h, rescale)
    model.model.norm.weight[:h] = base.model.norm.weight * rescale
    model.model.norm.weight[layout.out] = 1.0
    model.lm_head.weight[:, :h] = base.lm_head.weight
    model.lm_head.weight[labels, :h] = 0
    return key_scale


def _copy_layer(src, dst, h: int, rescale: float) -> None:
    a, b = src.self_attn, dst.self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        w = getattr(a, name).weight
        getattr(b, name).weight[: w.shape[0], :h] = w
    b.o_proj.weight[:h, : a.o_proj.weight.shape[1]] = a.o_proj.weight
    m, n = src.mlp, dst.mlp
    inner = m.gate_proj.weight.shape[0]
    n.gate_proj.weight[:inner, :h] = m.gate_proj.weight
    n.up_proj.weight[:inner, :h] = m.up_proj.weight
    n.down_proj.weight[:h, :inner] = m.down_proj.weight
    dst.input_layernorm.weight[:h] = src.input_layernorm.weight * rescale
    dst.post_attention_layernorm.weight[:h] = src.post_attention_layernorm.weight * rescale


def _candidate_tokens(prompt: list[int], labels: list[int]) -> list[int]:
    """The item token after each label token (two tokens on) in a rendered prompt."""
    positions = [p for p, t in enumerate(prompt) if t in labels]
    return [prompt[p + 2] for p in positions[: len(labels)]]


def _residual_norms(
    model, prompts: list[list[int]], layer: int, marker: int, labels: list[int], item_token_ids: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Norms of the residual stream entering ``layer`` at markers, candidates' item tokens, label
    tokens and last tokens of ``prompts`` (a forward with the compiled layers as they are now)."""
    captured = []
    hook = model.model.layers[layer].input_layernorm.register_forward_pre_hook(
        lambda _, x: captured.append(x[0])
    )
    try:
        for n in range(0, len(prompts), 64):
            ids, mask, _ = pad_batch(prompts[n : n + 64], 0)
            model.model(input_ids=ids, attention_mask=mask)
    finally:
        hook.remove()
    items = set(item_token_ids.tolist())
    found = {"marker": [], "sink": [], "candidate": [], "label": [], "final": []}
    for n, prompt in enumerate(prompts):
        x = captured[n // 64][n % 64].norm(dim=-1)
        cut = prompt.index(marker)
        found["marker"].append(x[cut])
        found["sink"].append(x[0])
        found["final"].append(x[len(prompt) - 1])
        found["label"] += [x[p] for p, t in enumerate(prompt) if t in labels]
        found["candidate"] += [x[p] for p, t in enumerate(prompt) if p > cut and t in items]
    return {name: torch.stack(v) for name, v in found.items()}


def _set_gather(
    model, base, layout: Layout, basis: torch.Tensor, norms: dict, gather_heads: int, head_dim: int
) -> None:
    """Layer L's first heads: every token attends to the marker (CONST query, MARK key, in the
    slowest rotary pair, so distance does not matter) and copies ``basis^T norm(x_marker)`` into
    PRED — the item LM's final-norm state, projected."""
    layer, width = model.model.layers[len(base.model.layers)], layout.width
    attn, slow = layer.self_attn, head_dim // 2 - 1
    layer.input_layernorm.weight[:] = 1.0
    emb = model.model.embed_tokens.weight
    scaled = lambda value, norm: value * math.sqrt(width) / norm  # noqa: E731  RMSNorm of one coordinate
    largest = ROBUST * float(norms["final"].max().clamp(min=norms["candidate"].max()))
    query = scaled(float(emb[0, layout.const]), largest)
    key = scaled(float(emb[:, layout.mark].max()), float(norms["marker"].max()))
    gain = math.sqrt(GATHER_SCORE * math.sqrt(head_dim) / (query * key))
    read = basis.T * base.model.norm.weight[None] * math.sqrt(layout.hidden / width)  # [R, hidden]
    for head in range(gather_heads):
        attn.q_proj.weight[head * head_dim + slow, layout.const] = gain
        attn.k_proj.weight[head * head_dim + slow, layout.mark] = gain
        rows = range(head * head_dim, min((head + 1) * head_dim, layout.rank))
        for t, r in enumerate(rows):
            attn.v_proj.weight[head * head_dim + t, : layout.hidden] = read[r]
            attn.o_proj.weight[layout.pred.start + r, head * head_dim + t] = 1.0


def _set_binding(model, layout: Layout, norms: dict, head: int, head_dim: int, pred_norm: float) -> float:
    """Layer L's next head binds each candidate's item token to its label. Every token rests on
    the system block's first token (CONST query, SINK key, slowest rotary pair, score ``SINK``) — it
    is there in every prompt and in every cached block's canonical context; item
    tokens also query label tokens by position (ITEM_FLAG query, LABEL_FLAG key, the other rotary
    pairs fitted by ``positional.positional_weights``): ``SINK + BIND_MARGIN`` two tokens back,
    ``-BIND_MARGIN`` elsewhere. A positional score alone cannot tell two tokens back from three
    (rotary frequencies are at most one radian per token), so tokens that are not items must not
    query by position at all. The head copies the one-hot label into LABEL at a magnitude ``SPAN``
    times anything else in a candidate's residual; returns that magnitude."""
    layer = model.model.layers[len(model.model.layers) - 2]
    attn, half, width = layer.self_attn, head_dim // 2, layout.width
    emb = model.model.embed_tokens.weight
    scaled = lambda value, norm: value * math.sqrt(width) / norm  # noqa: E731  RMSNorm of one coordinate
    item = ROBUST * float(norms["candidate"].median())  # scores as stated for norms this large, larger below
    flag = scaled(float(emb[:, layout.item_flag].max()), item)
    label_key = scaled(float(emb[:, layout.label_flag].max()), float(norms["label"].median()))
    sink_key = scaled(float(emb[:, layout.sink].max()), float(norms["sink"].median()))
    const = scaled(float(emb[0, layout.const]), item)
    freqs = model.model.rotary_emb.inv_freq.float().cpu()[: half - 1]  # the slowest pair is the sink's
    with torch.enable_grad():
        weights = positional_weights(freqs, BIND_OFFSET, BIND_MARGIN, POSITIONAL_SPAN)
    check_binding(weights, freqs)
    # Scores in units of BIND_MARGIN, scaled so the label gets SINK + BIND_MARGIN and other labels
    # at most -(SINK + BIND_MARGIN): the label beats the sink, the sink beats every other label.
    amplitude = (weights.abs() * math.sqrt(head_dim) * (1 + SINK / BIND_MARGIN)).sqrt()
    phase = -2 * freqs
    base, slow = head * head_dim, head * head_dim + half - 1
    attn.q_proj.weight[base:slow, layout.item_flag] = weights.sign() * amplitude * torch.cos(phase) / flag
    attn.q_proj.weight[base + half : base + head_dim - 1, layout.item_flag] = (
        weights.sign() * amplitude * torch.sin(phase) / flag
    )
    attn.k_proj.weight[base:slow, layout.label_flag] = amplitude / label_key
    gain = math.sqrt(SINK * math.sqrt(head_dim) / (const * sink_key))
    attn.q_proj.weight[slow, layout.const] = gain
    attn.k_proj.weight[slow, layout.sink] = gain
    bound = SPAN * (float(norms["candidate"].max()) + pred_norm)
    label_src_value = scaled(float(emb[:, layout.label_src].max()), float(norms["label"].median()))
    for j in range(layout.k):
        attn.v_proj.weight[base + j, layout.label_src.start + j] = 1.0
        attn.o_proj.weight[layout.label.start + j, base + j] = bound / label_src_value
    return bound


def _set_product(model, layout: Layout, bound: float, score_unit: float, key_scale: float) -> None:
    """Layer L's MLP: SCORE = score_unit * PRED . KEY / key_scale (the item LM's logit of the
    token's item) at candidates, whose norm is ``bound``; two SwiGLU neurons per rank, exact by
    silu(a) b - silu(-a) b = a b."""
    layer = model.model.layers[len(model.model.layers) - 2]
    layer.post_attention_layernorm.weight[:] = 1.0
    mlp = layer.mlp
    scale = score_unit * bound**2 / (layout.width * key_scale)  # undoes RMSNorm's 1/bound on both factors
    for r in range(layout.rank):
        for sign, neuron in ((1.0, 2 * r), (-1.0, 2 * r + 1)):
            mlp.gate_proj.weight[neuron, layout.pred.start + r] = sign
            mlp.up_proj.weight[neuron, layout.key.start + r] = sign
            mlp.down_proj.weight[layout.score, neuron] = scale


def _set_lookup(
    model,
    layout: Layout,
    tau: float,
    bias: np.ndarray,
    bound: float,
    score_unit: float,
    final_norm: float,
    head_dim: int,
    labels: list[int],
) -> None:
    """Layer L+1: the last token attends to candidates with score ``tau * s + bias[label] + gate``
    and copies their one-hot labels into OUT; the label tokens' logits read OUT. A candidate's
    LABEL dominates its norm, so its normalised LABEL is ``unit`` whatever else it holds; other
    tokens have (next to) no LABEL, and a normalised SCORE is at most ``unit`` anywhere, so
    ``gate`` exceeds any score a non-candidate can reach."""
    layer = model.model.layers[-1]
    layer.input_layernorm.weight[:] = 1.0
    attn, slow = layer.self_attn, head_dim // 2 - 1
    unit = math.sqrt(layout.width)  # a coordinate's RMSNorm when it dominates its residual
    query = float(model.model.embed_tokens.weight[0, layout.const]) * unit / final_norm
    attn.q_proj.weight[slow, layout.const] = (
        math.sqrt(head_dim) / query
    )  # score = key at a typical last token
    gate = abs(tau) * bound / score_unit + float(np.abs(bias).max()) + GATE_MARGIN
    attn.k_proj.weight[slow, layout.score] = tau * bound / (score_unit * unit)
    for j in range(layout.k):
        attn.k_proj.weight[slow, layout.label.start + j] = (gate + float(bias[j])) / unit
        attn.v_proj.weight[j, layout.label.start + j] = 1.0
        attn.o_proj.weight[layout.out.start + j, j] = 1.0
    for j, token in enumerate(labels):
        model.lm_head.weight[token, layout.out.start + j] = OUT_SCALE * final_norm / (unit * unit)


@torch.no_grad()
def compiled_agreement(
    model, prompts: list[list[int]], expected: torch.Tensor, labels: list[int], pad_id: int
) -> float:
    """Share of ``prompts`` whose top label by the compiled model's logits is the top of ``expected``."""
    got = torch.stack(score_full(model, prompts, [labels] * len(prompts), pad_id))
    return float((got.argmax(1) == expected.argmax(1)).float().mean())
