"""The compiled lookup's layout (which extra hidden dimension carries what), its constants, and the
checks of the margins those constants rely on, run when a ranker is compiled."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rcllm_sdk.errors import CompileError


@dataclass(slots=True, frozen=True)
class Layout:
    """Hidden dimensions of a compiled ranker: the item LM's ``hidden`` first, then the lookup's."""

    hidden: int
    k: int
    rank: int
    multiple: int = 1  # the width is rounded up to a multiple of this (Llama needs heads | hidden)

    @property
    def const(self) -> int:  # small, in every token's embedding: queries of the compiled heads
        return self.hidden

    @property
    def mark(self) -> int:  # small, in the marker's embedding: what the prediction gather finds
        return self.hidden + 1

    @property
    def label_flag(self) -> int:  # large, in label tokens' embeddings: what the label binding finds
        return self.hidden + 2

    @property
    def score(self) -> int:  # the item LM's logit of a candidate's item, at its item token
        return self.hidden + 3

    @property
    def item_flag(self) -> int:  # small, in item tokens' embeddings: queries of the label binding
        return self.hidden + 4

    @property
    def sink(self) -> int:  # small, in the system block's first token: where unbound tokens rest
        return self.hidden + 5

    def _span(self, n: int, size: int) -> slice:
        start = self.hidden + 6 + n * self.k
        return slice(start, start + size)

    @property
    def label_src(self) -> slice:  # one-hot label identity in label tokens' embeddings
        return self._span(0, self.k)

    @property
    def label(self) -> slice:  # the bound label at a candidate's item token (dominates its norm)
        return self._span(1, self.k)

    @property
    def out(self) -> slice:  # the label distribution at the last token, read by the label logits
        return self._span(2, self.k)

    @property
    def key(self) -> slice:  # the item's rank-R output embedding, in item tokens' embeddings
        start = self.hidden + 6 + 3 * self.k
        return slice(start, start + self.rank)

    @property
    def pred(self) -> slice:  # the marker's rank-R prediction, copied to every later token
        start = self.hidden + 6 + 3 * self.k + self.rank
        return slice(start, start + self.rank)

    @property
    def width(self) -> int:
        return math.ceil((self.hidden + 6 + 3 * self.k + 2 * self.rank) / self.multiple) * self.multiple


# Scores of the compiled attention heads (logits before softmax) and the margins they rely on.
GATHER_SCORE = 30.0  # attention score of the marker over other tokens, at the least favourable norms
BIND_MARGIN = 30.0  # positional score margin of the label binding (two tokens back vs elsewhere)
SINK = 30.0  # score of the system block's first token in the binding head: where unbound tokens rest
MIN_SCORE_GAP = 10.0  # every head's intended key must win by this much (competitors leak < e^-10 each)
ROBUST = 10.0  # the gather and binding scores hold for residual norms up to this many times the calibration's
SMALL = (
    1e-3  # size of the extra embedding features relative to an item embedding (the item LM barely sees them)
)
MAX_SMALL = 1e-2  # ... at most this: the item LM's own states must stay as trained
SPAN = 100.0  # how far the bound label dominates everything else in a candidate's residual
MIN_SPAN = 10.0  # ... at least this, or RMSNorm would scale candidates' labels differently
LABEL_SCALE = 1e4  # label tokens' extra features relative to an item embedding (they dominate their state)
GATE_MARGIN = 50.0  # the lookup's gate exceeds any score a token without a bound label reaches by this
OUT_SCALE = 10.0  # label logit per unit of OUT at the last token
MAX_SLOW_ANGLE = 0.05  # radians the slowest rotary pair may turn over the longest prompt (content matching)
BIND_OFFSET = 2  # a candidate's item token binds the label token this many places back
NEAREST_OTHER_LABEL = 6  # the closest another candidate's label can be (label, newline, item, newline)
POSITIONAL_SPAN = 2048  # the positional binding is fitted over this many relative distances


def check_margins(cfg, k: int, head_dim: int) -> None:
    """The compiled lookup's constants against the margins they need, for the item LM ``cfg``;
    raises ``CompileError`` naming the one violated."""
    if k > head_dim:
        raise CompileError(f"{k} candidates do not fit one head of {head_dim} dimensions")
    for name, value in (("GATHER_SCORE", GATHER_SCORE), ("SINK", SINK), ("BIND_MARGIN", BIND_MARGIN)):
        if value < MIN_SCORE_GAP:
            raise CompileError(f"{name}={value} is below the score gap {MIN_SCORE_GAP} the heads need")
    if not (SMALL <= MAX_SMALL and SPAN >= MIN_SPAN):
        raise CompileError(f"SMALL={SMALL} must be <= {MAX_SMALL} and SPAN={SPAN} >= {MIN_SPAN}")
    slowest = _rope_theta(cfg) ** (-(head_dim - 2) / head_dim)
    angle = slowest * cfg.max_position_embeddings
    if angle > MAX_SLOW_ANGLE:
        raise CompileError(
            f"the slowest rotary pair turns {angle:.3f} rad over {cfg.max_position_embeddings} positions "
            f"(at most {MAX_SLOW_ANGLE}): raise the item LM's rope_theta"
        )


def check_binding(weights: torch.Tensor, freqs: torch.Tensor) -> None:
    """The fitted positional binding: its own label must beat the sink, and the sink every other
    candidate's label, by ``MIN_SCORE_GAP`` (scores as :func:`_set_binding` scales them)."""
    distance = torch.arange(POSITIONAL_SPAN, dtype=torch.float32)
    score = weights @ torch.cos((distance[None] - BIND_OFFSET) * freqs[:, None])
    scale = 1 + SINK / BIND_MARGIN
    own = float(score[BIND_OFFSET]) * scale - SINK
    others = SINK - float(score[NEAREST_OTHER_LABEL:].max()) * scale
    if min(own, others) < MIN_SCORE_GAP:
        raise CompileError(
            f"positional label binding too weak: own label over sink {own:.1f}, sink over other labels "
            f"{others:.1f} (each must be >= {MIN_SCORE_GAP})"
        )


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
