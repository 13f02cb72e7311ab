"""Which tokens the partial prefill recomputes.

A policy is named by a spec string (config, CLI, reports):

    full               every token (must equal the model's own forward)
    none               fresh tokens only (labels, query): pure reuse of cached blocks
    block_head:K       fresh tokens + the first K tokens of every cached user/item block (EPIC)
    deviation:R:L      CacheBlend: all tokens run through layer L, then fresh tokens + the
                       fraction R of the others whose K/V deviate most from the cache

Fresh tokens are always computed. The system block sits at its true position with nothing
before it, so its cached KV is exact and no static policy recomputes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..prompt.renderer import LABEL, QUERY, SYSTEM

FRESH_KINDS = (LABEL, QUERY)
DEFAULT_POLICY = "block_head:2"

Ranges = list[tuple[int, int]]  # half-open token ranges [start, end) within one prompt


@dataclass(slots=True, frozen=True)
class Policy:
    """A parsed selection policy; it plans token ranges, the runner turns them into tensors."""

    name: str
    head: int = 0
    ratio: float = 0.0
    check_layer: int = 1

    @property
    def spec(self) -> str:
        if self.name == "block_head":
            return f"block_head:{self.head}"
        if self.name == "deviation":
            return f"deviation:{self.ratio:g}:{self.check_layer}"
        return self.name

    def selected_ranges(self, kinds: list[str], lengths: list[int]) -> Ranges:
        """Tokens that run every layer (for ``deviation``: every layer up to the check)."""
        if self.name in ("full", "deviation"):
            return [(0, sum(lengths))]
        ranges, start = [], 0
        for kind, n in zip(kinds, lengths, strict=False):
            if kind in FRESH_KINDS:
                ranges.append((start, start + n))
            elif self.name == "block_head" and kind != SYSTEM and self.head:
                ranges.append((start, start + min(self.head, n)))
            start += n
        return ranges


def fresh_ranges(kinds: list[str], lengths: list[int]) -> Ranges:
    """Tokens of blocks that are never cached (labels, query)."""
    ranges, start = [], 0
    for kind, n in zip(kinds, lengths, strict=False):
        if kind in FRESH_KINDS:
            ranges.append((start, start + n))
        start += n
    return ranges


def parse_policy(spec: str | Policy) -> Policy:
    """``"block_head:8"`` -> ``Policy("block_head", head=8)``; raises ConfigError on a bad spec."""
    if isinstance(spec, Policy):
        return spec
    name, *args = str(spec).strip().split(":")
    try:
        if name in ("full", "none") and not args:
            return Policy(name)
        if name == "block_head" and len(args) == 1 and int(args[0]) >= 0:
            return Policy(name, head=int(args[0]))
        if name == "deviation" and len(args) in (1, 2):
            ratio, layer = float(args[0]), int(args[1]) if len(args) == 2 else 1
            if 0.0 <= ratio <= 1.0 and layer >= 0:
                return Policy(name, ratio=ratio, check_layer=layer)
    except ValueError:
        pass
    raise ConfigError(
        f"unknown selection policy {spec!r}; use full, none, block_head:K or deviation:RATIO[:LAYER]"
    )
