"""Structured initialisations of a Llama model's attention, for the accuracy-gate experiments.

A ranker reads its answer from label logits, so it needs a *binding* circuit: a positional
head that writes each candidate's label into the candidate's item tokens, and a later head that
matches the query against those items and copies the label. Gradient descent from a random
start finds neither on CPU budgets (NOTEBOOK.md, "What the ranker learns"). These functions start a
model closer to that circuit; training still learns everything (no weight is frozen).

- :func:`mimetic_init`: later layers start as content matchers (``W_q = W_k``).
- :func:`label_head_init`: layer 0's first head starts as a positional head attending a fixed
  number of tokens back (from an item token to its label) and copying what it reads.
"""

from __future__ import annotations

import torch

from rcllm_sdk.pipelines.positional import positional_weights

CONSTANT_DIM = 0  # the hidden dimension label_head_init turns into a constant "bias" input


def mimetic_init(model, scale: float, seed: int = 0) -> None:
    """Every attention layer after the first starts as a content matcher: each query head shares its
    KV head's projection (``W_q = W_k = scale * P``, ``P`` orthonormal rows), so a token attends most to
    tokens whose embedding matches its own (after RoPE, at short range). Layer 0 keeps the default
    init: it has to learn positional heads (label -> item binding). After Trockman & Kolter,
    "Mimetic Initialization of Self-Attention Layers" (2023). Measured effect: NOTEBOOK.md."""
    gen = torch.Generator().manual_seed(seed + 1)
    for layer in model.model.layers[1:]:
        attn = layer.self_attn
        dim, hidden = attn.head_dim, attn.q_proj.in_features
        per_kv = attn.q_proj.out_features // attn.k_proj.out_features
        with torch.no_grad():
            for kv in range(attn.k_proj.out_features // dim):
                basis = scale * torch.linalg.qr(torch.randn(hidden, dim, generator=gen))[0].T  # [dim, hidden]
                attn.k_proj.weight[kv * dim : (kv + 1) * dim] = basis
                for q in range(kv * per_kv, (kv + 1) * per_kv):
                    attn.q_proj.weight[q * dim : (q + 1) * dim] = basis


def label_head_init(
    model, offset: int, margin: float = 12.0, copy_gain: float = 0.5, seed: int = 0, max_distance: int = 2048
) -> None:
    """Layer 0's query head 0 attends ``offset`` tokens back, whatever the tokens are, and copies
    what it reads into the residual stream.

    Llama attention has no bias, so position-only queries and keys need a constant input: hidden
    dimension :data:`CONSTANT_DIM` of every token embedding is set to one value. Query head 0 and
    KV head 0 read only that dimension; after RoPE their score at distance ``d`` is
    ``sum_i w_i cos((d - offset) * freq_i)``, with per-frequency weights ``w`` fitted so that the
    score is about ``+margin`` at ``d = offset`` and at most about ``-margin`` elsewhere within
    ``max_distance`` (so per-token differences in the normalised constant cannot move the peak). KV
    head 0's values and head 0's output are a random projection and its transpose times
    ``copy_gain``. Later layers' queries and keys ignore the constant dimension. Query heads that
    share KV head 0 (grouped-query attention) get positional keys too. Tokens whose embeddings are
    much larger than the rest (e.g. item tokens with full-scale co-occurrence parts) normalise the
    constant smaller and get a weaker peak (about 0.7-0.95 instead of 0.99 at ``margin`` 12).
    """
    attn = model.model.layers[0].self_attn
    dim, half = attn.head_dim, attn.head_dim // 2
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb[:, CONSTANT_DIM] = 0.5 * emb.std() * emb.shape[1] ** 0.5
        constant = float(model.model.layers[0].input_layernorm(emb)[:, CONSTANT_DIM].median())
        for layer in model.model.layers[1:]:
            layer.self_attn.q_proj.weight[:, CONSTANT_DIM] = 0
            layer.self_attn.k_proj.weight[:, CONSTANT_DIM] = 0
    freqs = model.model.rotary_emb.inv_freq.float().cpu()  # [half]; pairs (i, i + half) rotate at freqs[i]
    weights = positional_weights(freqs, offset, margin, max_distance)
    amplitude = (weights.abs() * dim**0.5).sqrt() / constant  # score = amplitude^2 constant^2 / sqrt(dim)
    phase = -offset * freqs
    gen = torch.Generator().manual_seed(seed + 2)
    copy = torch.linalg.qr(torch.randn(attn.q_proj.in_features, dim, generator=gen))[0].T  # [dim, hidden]
    copy[:, CONSTANT_DIM] = 0
    with torch.no_grad():
        attn.q_proj.weight[:dim] = 0
        attn.k_proj.weight[:dim] = 0
        attn.k_proj.weight[:half, CONSTANT_DIM] = amplitude
        attn.q_proj.weight[:half, CONSTANT_DIM] = weights.sign() * amplitude * torch.cos(phase)
        attn.q_proj.weight[half:dim, CONSTANT_DIM] = weights.sign() * amplitude * torch.sin(phase)
        attn.v_proj.weight[:dim] = copy
        attn.o_proj.weight[:, :dim] = copy_gain * copy.T
