"""Measure the guard's cost model on an engine's own model and attention backend.

Synthetic prompts (random token ids, the template's block layout: system, user, label/item
pairs, query) are scored in full prefill and by reuse at a few sizes, their blocks held in a
private in-process store (the engine's store is never touched; a remote store's latency is
not in the model). Each shape is timed a few times, interleaved, and the fastest kept (the
run least disturbed by other load); then ``guard.fit`` solves for the coefficients.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from ..cache.base import LOCAL, MISS, Read
from ..model.scoring import score_full
from ..prompt.renderer import Block, RenderedPrompt, block_hash
from .guard import CostModel, fit, prompt_shape
from .policies import parse_policy

SHAPES = ((4, 4), (8, 24), (24, 8), (16, 32))  # (tokens per item, items): short to long prompts
REPEATS = 5
# One fit per model, backend, policy and device in a process: recommenders made by
# ``with_config`` and engines of several stores share it.
_FITTED: dict[tuple, CostModel] = {}
_FITTED_LOCK = threading.Lock()


class _DictStore:
    """The calibration's private store."""

    def __init__(self):
        self.values: dict[int, torch.Tensor] = {}

    def batched_read(self, keys, placement=None):
        return [Read(self.values[k], LOCAL) if k in self.values else Read(None, MISS) for k in keys]

    def batched_put(self, items, placement=None):
        self.values.update(items)
        return []


def calibrate(engine, shapes=SHAPES, repeats: int = REPEATS, seed: int = 0) -> CostModel:
    """Fit the cost model of ``engine``'s model, attention backend and policy (once per process)."""
    from .engine import BlockEngine  # the engine module imports this one lazily

    key = (engine.ranker.fingerprint, engine.attention.name, engine.policy.spec, str(engine.view.device))
    with _FITTED_LOCK:
        if key not in _FITTED:
            probe = BlockEngine(
                engine.ranker, _DictStore(), engine.policy, engine.attention.name, guard=False
            )
            try:
                _FITTED[key] = _fit(probe, _prompts(engine, shapes, seed), repeats)
            finally:
                probe.close()
        return _FITTED[key]


def _prompts(engine, shapes, seed: int) -> list[tuple[RenderedPrompt, list[int]]]:
    rng = np.random.default_rng(seed)
    vocab = engine.ranker.model.get_input_embeddings().weight.shape[0]
    out = []
    for tokens, items in shapes:
        layout = [("system", 12), ("user", 24)]
        layout += [pair for _ in range(items) for pair in (("label", 2), ("item", tokens))]
        blocks, start = [], 0
        for kind, n in [*layout, ("query", 8)]:
            ids = (
                tuple(int(t) for t in rng.integers(1, vocab, n))
                if kind != "system"
                else tuple(range(1, n + 1))
            )
            blocks.append(Block(kind, ids, start, block_hash(f"calibrate:{seed}", kind, ids)))
            start += n
        labels = [int(t) for t in rng.integers(1, vocab, items)]
        out.append((RenderedPrompt(tuple(blocks), tuple(range(items)), ("A",) * items), labels))
    return out


def _fit(probe, prompts, repeats: int) -> CostModel:
    model = probe.ranker.model
    for prompt, labels in prompts:  # warm: stores every block, first-call allocations
        probe.score([prompt], [labels])
        score_full(model, [prompt.input_ids], [labels], 0)
    probe.flush()
    full, reuse = {i: [] for i in range(len(prompts))}, {i: [] for i in range(len(prompts))}
    for _ in range(repeats):
        for i, (prompt, labels) in enumerate(prompts):
            full[i].append(_ms(lambda p=prompt, y=labels: score_full(model, [p.input_ids], [y], 0)))
            reuse[i].append(_ms(lambda p=prompt, y=labels: probe.score([p], [y])))
    policy, layers = parse_policy(probe.policy), probe.view.n_layers
    shapes = [
        prompt_shape([b.kind for b in p.blocks], [len(b.token_ids) for b in p.blocks], policy, layers)
        for p, _ in prompts
    ]
    return fit(
        [(s.tokens, float(np.min(full[i]))) for i, s in enumerate(shapes)],
        [(s.recomputed, s.blocks, float(np.min(reuse[i]))) for i, s in enumerate(shapes)],
    )


def _ms(fn) -> float:
    """Wall time of ``fn`` in ms, GPU work included (CUDA runs asynchronously)."""
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000.0
