"""When block reuse cannot pay: a measured cost model of one request in each mode. No torch.

Full prefill costs a fixed part per request plus a part per prompt token. Reuse costs its own
fixed part (store round trip, planning, the per-layer path), a part per cached block (fetch,
unpack, copy, re-rotation) and, per recomputed token, what full prefill pays per token. The
engine runs full prefill for a prompt whose predicted reuse time is not below its predicted
full time (``reuse_pays``). The coefficients are fitted from timings (``fit``;
``runtime.calibrate`` measures them on the engine's own model when it first scores), never
set by hand.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .policies import FRESH_KINDS, Policy


@dataclass(slots=True, frozen=True)
class CostModel:
    """Predicted milliseconds of one request: ``full_ms(tokens)`` and ``reuse_ms(recomputed, blocks)``."""

    full_fixed_ms: float
    full_token_ms: float
    reuse_fixed_ms: float
    reuse_block_ms: float
    reuse_token_ms: float

    def full_ms(self, tokens: int) -> float:
        return self.full_fixed_ms + self.full_token_ms * tokens

    def reuse_ms(self, recomputed: int, blocks: int) -> float:
        return self.reuse_fixed_ms + self.reuse_block_ms * blocks + self.reuse_token_ms * recomputed

    def reuse_pays(self, tokens: int, recomputed: int, blocks: int) -> bool:
        return self.reuse_ms(recomputed, blocks) < self.full_ms(tokens)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(slots=True, frozen=True)
class Shape:
    """What the cost model needs of one prompt under one policy."""

    tokens: int
    recomputed: int
    blocks: int  # cached (non-fresh) blocks


def prompt_shape(kinds: list[str], lengths: list[int], policy: Policy, layers: int) -> Shape:
    """Tokens, recomputed tokens (layer-averaged for ``deviation``) and cached blocks of a prompt."""
    tokens = sum(lengths)
    selected = sum(end - start for start, end in policy.selected_ranges(kinds, lengths))
    if policy.name == "deviation":
        fresh = sum(n for kind, n in zip(kinds, lengths, strict=True) if kind in FRESH_KINDS)
        narrowed = fresh + policy.ratio * (tokens - fresh)
        full_layers = min(layers, policy.check_layer + 1)
        selected = round((full_layers * tokens + (layers - full_layers) * narrowed) / max(layers, 1))
    blocks = sum(1 for kind in kinds if kind not in FRESH_KINDS)
    return Shape(tokens, selected, blocks)


def fit(full: list[tuple[int, float]], reuse: list[tuple[int, int, float]]) -> CostModel:
    """Fit ``full``: ``(tokens, ms)`` and ``reuse``: ``(recomputed, blocks, ms)`` samples (two
    distinct shapes each at least). A recomputed token runs the same layers as a prompt token
    in full prefill, so both share the per-token cost of the full line; reuse's fixed and
    per-block parts are fitted to what is left. Least squares, coefficients clamped at zero."""
    full_fixed, token = _line([t for t, _ in full], [ms for _, ms in full])
    rows = [(1.0, float(b)) for _, b, _ in reuse]
    fixed, block = _least_squares(rows, [ms - token * r for r, _, ms in reuse])
    return CostModel(full_fixed, token, fixed, block, token)


def _line(x: list[float], y: list[float]) -> tuple[float, float]:
    intercept, slope = _least_squares([(1.0, float(v)) for v in x], y)
    return intercept, slope


def _least_squares(rows: list[tuple[float, ...]], y: list[float]) -> tuple[float, ...]:
    """Non-negative least squares by normal equations, dropping a negative coefficient and refitting."""
    active = list(range(len(rows[0])))
    while True:
        coef = _solve([[r[i] for i in active] for r in rows], y)
        if all(c >= 0 for c in coef) or len(active) == 1:
            out = [0.0] * len(rows[0])
            for i, c in zip(active, coef, strict=True):
                out[i] = max(c, 0.0)
            return tuple(out)
        active.pop(min(range(len(coef)), key=lambda i: coef[i]))


def _solve(rows: list[list[float]], y: list[float]) -> list[float]:
    """Solve ``(A^T A) c = A^T y`` by Gaussian elimination (a handful of unknowns)."""
    n = len(rows[0])
    a = [[sum(r[i] * r[j] for r in rows) for j in range(n)] for i in range(n)]
    b = [sum(r[i] * v for r, v in zip(rows, y, strict=True)) for i in range(n)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda i: abs(a[i][col]))
        a[col], a[pivot], b[col], b[pivot] = a[pivot], a[col], b[pivot], b[col]
        if abs(a[col][col]) < 1e-12:
            a[col][col] = 1e-12  # a direction the samples do not constrain: its coefficient stays ~0
        for i in range(col + 1, n):
            f = a[i][col] / a[col][col]
            a[i] = [u - f * v for u, v in zip(a[i], a[col], strict=True)]
            b[i] -= f * b[col]
    c = [0.0] * n
    for i in reversed(range(n)):
        c[i] = (b[i] - sum(a[i][j] * c[j] for j in range(i + 1, n))) / a[i][i]
    return c
